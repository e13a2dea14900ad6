"""The `edge-agent review` command's logic (cli.py stays a thin skin): check the setup, then serve or export."""
from __future__ import annotations

import ipaddress
import signal
import sys
from pathlib import Path
from typing import Any, Callable

from ..config import ConfigError, Settings
from ..store import StoreError

LOOPBACK_NAMES = ("127.0.0.1", "localhost", "[::1]", "::1")


def _folders(s: Settings) -> tuple[Path, Path]:
    if s.processed_dir is None and s.inbox is None:
        raise ConfigError("the review app needs the processed folder: pass --processed-dir (and --quarantine-dir) or "
                          "--inbox, or use the agent's --config file")
    processed = s.processed_path
    quarantine = s.quarantine_dir or (s.inbox.parent / "quarantine" if s.inbox else processed.parent / "quarantine")
    return processed, quarantine


def _require_flask() -> None:
    try:
        import flask  # noqa: F401
    except ImportError:
        raise ConfigError("the review app needs Flask: install the [review] extra (pip install "
                          "'edge-derm-screen[review]') into the agent's environment") from None


def _is_loopback(host: str) -> bool:
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def serve_or_export(s: Settings, host: str, port: int, export_dir: Path | None, limit: int, include_all: bool,
                    echo: Callable[[str], Any] = print) -> None:
    _require_flask()
    from ..signing import trust_from_settings
    from . import db as rdb

    db = s.db_path
    processed, quarantine = _folders(s)
    if not db.exists():
        raise StoreError(f"no database at {db}: run `edge-agent run` or `scan` first, or pass the right --db")
    try:
        rdb.ensure_schema(db)  # adds the reviews table to an older database (once); results are not touched
    except StoreError:
        raise
    trust = trust_from_settings(s)
    if export_dir is not None:
        from .export import ExportError, export

        try:
            n = export(db, export_dir, processed, s.model_path, trust, limit=limit, flagged_only=not include_all,
                       log=lambda m: echo(f"review export: {m}"))
        except ExportError as e:
            raise ConfigError(str(e)) from None
        echo(f"wrote {export_dir / 'index.html'}: {n['cases']} cases, {n['thumbnails']} thumbnails, "
             f"{n['heatmaps']} heatmaps (open it in any browser; it contains patient images - keep it private)")
        return
    from werkzeug.serving import make_server

    from .app import ReviewConfig, create_app

    if not _is_loopback(host):
        echo(f"WARNING: listening on {host}: anyone who can reach this address can read results and images and "
             "record verdicts - the review app has no login. Prefer 127.0.0.1 and an SSH tunnel.")
    allowed = tuple(dict.fromkeys([*("127.0.0.1", "localhost", "[::1]"), host if ":" not in host else f"[{host}]"]))
    app = create_app(ReviewConfig(db=db, processed=processed, quarantine=quarantine, bundle=s.model_path,
                                  trust=trust, allowed_hosts=allowed, providers=s.providers, max_pixels=s.max_pixels))
    try:
        server = make_server(host, port, app, threaded=True)
    except (OSError, SystemExit) as e:  # werkzeug prints its own hint and exits 1 on a busy port
        why = e.strerror if isinstance(e, OSError) else "address in use or not available"
        raise ConfigError(f"cannot listen on {host}:{port} ({why}); is another review app running? pass "
                          "another --port") from None

    def stop(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    shown = f"[{host}]" if ":" in host else host
    echo(f"edge-agent review: http://{shown}:{server.server_port}/ (database {db}; images {processed}; "
         f"quarantine {quarantine}); Ctrl-C stops it")
    sys.stdout.flush()
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
