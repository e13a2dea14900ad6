"""`edge-agent`: the command line, a thin layer over the library.

Exit codes: 0 success; 1 `scan` left files without an outcome, `status` shows
a warning, or `model verify` found problems; 2 invalid settings, bundle or
database at start, or another agent already holds the inbox or the database
(nothing was processed); 3 the agent stopped on a runtime
failure (unprocessed files stay in the inbox); 4 `run` stopped gracefully to restart
after a reload (SIGHUP) whose changes only apply at start (the systemd unit restarts
it: RestartForceExitStatus=4). SIGHUP itself reloads the model in place (modelswap.py).
`run`/`scan` exit 2 too when the site calibration file is made for another model id or fails its checksum.
`calibrate`: 0 the calibration file was written (or shown, --dry-run); 1 too few positive cases (the
message names how many more are needed; nothing written); 2 unusable input (unknown labels, missing files,
conflicting rows, no reviews, bundle or output problems; nothing written).

Heavy imports (onnxruntime, OpenCV) happen only in the commands that screen,
so `results` and `status` answer instantly.
"""
from __future__ import annotations

import csv
import json
import logging
import os
import signal
import sqlite3
import sys
import threading
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import click

from . import __version__
from . import log as logsetup
from . import scan_report
from .bundle import BundleError, default_bundle_path, verify_bundle
from .config import AFTER_CHOICES, FIELDS, HELP, LOG_LEVELS, ConfigError, Settings, default_text, load_settings
from .locks import Busy
from .output import OutputGroup, require_stdout
from .paths import refuse_inside_inbox
from .query import FORMATS, LIST_SORTS, SORTS
from .store import StoreError, connect

log = logging.getLogger("edge_agent.cli")

EXIT_INCOMPLETE, EXIT_CONFIG, EXIT_RUNTIME, EXIT_HUP = 1, 2, 3, 4


def _fail(msg: str, code: int = EXIT_CONFIG) -> NoReturn:
    click.echo(f"edge-agent: error: {msg}", err=True)
    sys.exit(code)


# --- options shared by `run` and `scan`, generated from Settings -------------------------

_FLAG_TYPES: dict[str, Any] = {"int": int, "float": float, "str": str}


def _flag(name: str) -> str:
    """The flag of setting `name`: the config key with dashes (config.example.toml promises exactly that)."""
    return "--" + name.replace("_", "-")


def _help(name: str, extra: str = "") -> str:
    """The setting's help with its real default (the flags themselves default to None, so that an unset flag
    leaves the environment and the config file in charge, and click cannot show the default itself)."""
    text = default_text(name)
    return HELP[name] + extra + (f"  [default: {text}]" if text is not None else "")


# Repeatable settings keep their old singular flag as a second name (--provider, --threshold, --trusted-key).
_SPECIAL = {
    "inbox": click.option(_flag("inbox"), type=click.Path(path_type=Path), help=_help("inbox")),
    "providers": click.option(_flag("providers"), "--provider", "providers", multiple=True,
                              help=_help("providers", " (repeatable)")),
    "thresholds": click.option(_flag("thresholds"), "--threshold", "thresholds", multiple=True, metavar="NAME=P",
                               help=_help("thresholds", ", e.g. melanoma=0.2 or low_confidence=0.6 (repeatable)")),
    "threshold_override": click.option(_flag("threshold_override") + "/--no-threshold-override", default=None,
                                       help=_help("threshold_override")),
    "after": click.option(_flag("after"), type=click.Choice(AFTER_CHOICES), help=_help("after")),
    "log_level": click.option(_flag("log_level"), type=click.Choice(LOG_LEVELS, case_sensitive=False),
                              help=_help("log_level")),
    "trusted_keys": click.option(_flag("trusted_keys"), "--trusted-key", "trusted_keys", multiple=True,
                                 type=click.Path(path_type=Path), metavar="PUBFILE",
                                 help=_help("trusted_keys", " (repeatable)")),
    "allow_unsigned_bundle": click.option(_flag("allow_unsigned_bundle") + "/--no-allow-unsigned-bundle", default=None,
                                          help=_help("allow_unsigned_bundle")),
}


def _settings_options(f: Callable[..., Any]) -> Callable[..., Any]:
    opts = []
    for name, fld in FIELDS.items():
        if name in _SPECIAL:
            opts.append(_SPECIAL[name])
            continue
        typ = str(fld.type)
        if "Path" in typ:
            opts.append(click.option(_flag(name), name, type=click.Path(path_type=Path), help=_help(name)))
        else:
            opts.append(click.option(_flag(name), name, type=_FLAG_TYPES[typ], help=_help(name)))
    opts.append(click.option("--config", "config_file", type=click.Path(path_type=Path),
                             help="TOML settings file (or EDGE_AGENT_CONFIG); flags > environment > file > defaults"))
    for o in reversed(opts):
        f = o(f)
    return f


def _format_options(f: Callable[..., Any]) -> Callable[..., Any]:
    """`--format text|json` (as `results` takes it) and the older `--json`, kept as an alias."""
    f = click.option("--json", "as_json", is_flag=True, help="same as --format json")(f)
    return click.option("--format", "fmt", type=click.Choice(["text", "json"]), default="text", show_default=True,
                        help="output format (json: for scripts)")(f)


def _load(flags: dict[str, Any], config_file: Path | None) -> Settings:
    try:
        return load_settings(flags, config_file=config_file)
    except ConfigError as e:
        _fail(str(e))


def _db_options(f: Callable[..., Any]) -> Callable[..., Any]:
    f = click.option("--config", "config_file", type=click.Path(path_type=Path), help="TOML settings file")(f)
    return click.option("--db", type=click.Path(path_type=Path), help="results database (or EDGE_AGENT_DB)")(f)


def _open_db(db: Path | None, config_file: Path | None) -> tuple[Settings, sqlite3.Connection]:
    s = _load({"db": db}, config_file)
    try:
        return s, connect(s.db_path, readonly=True)
    except (ConfigError, StoreError) as e:
        _fail(str(e))


def _not_ours(path: Path, e: Exception) -> NoReturn:
    if "malformed" in str(e).lower():  # ours, with damaged pages: say so, not "not ours"
        from .store import damaged

        _fail(damaged(path, e))
    _fail(f"{path} is not an edge-agent results database ({e}); pass the --db the agent writes to")


@click.group(cls=OutputGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(__version__, prog_name="edge-agent")
@click.pass_context
def main(ctx: click.Context) -> None:
    """Offline dermoscopy screening agent. Decision support for clinicians, not a diagnosis."""
    require_stdout(ctx.invoked_subcommand)  # output.py: a report with nowhere to print fails, says so


# --- run ---------------------------------------------------------------------------------

def _ignore_stray_signals(status: Callable[[], str], how: str) -> dict[int, Any]:
    """SIGUSR1/SIGUSR2/SIGALRM used to kill `run`/`scan` on the spot (their default action), e.g. a logrotate
    or monitoring script's `kill -USR1`: now a log line (USR1 also says how the agent is doing). Returns the
    previous handlers."""
    def on_stray(signum: int, frame: Any) -> None:
        log.warning("%s received and ignored (%s)%s", signal.Signals(signum).name, how,
                    f": {status()}" if signum == signal.SIGUSR1 else "")

    return {sig: signal.signal(sig, on_stray) for sig in (signal.SIGUSR1, signal.SIGUSR2, signal.SIGALRM)}


@main.command()
@_settings_options
def run(config_file: Path | None, **flags: Any) -> None:
    """Screen everything in the inbox, then watch it until SIGTERM/SIGINT (systemd Type=notify)."""
    s = _load(flags, config_file)
    logsetup.setup(s.log_level)
    from .infer import InferenceError
    from .notify import Notifier
    from .pipeline import Agent

    stop = threading.Event()

    def on_signal(signum: int, frame: Any) -> None:
        if stop.is_set():
            log.warning("second %s: exiting now; unfinished images stay in the inbox", signal.Signals(signum).name)
            os._exit(1)
        log.info("%s received: finishing the batch in flight", signal.Signals(signum).name)
        stop.set()

    try:
        agent = Agent(s, Notifier(), reload_settings=lambda: load_settings(flags, config_file=config_file))
    except ConfigError as e:
        _fail(str(e))

    def on_hup(signum: int, frame: Any) -> None:
        # SIGHUP (`systemctl reload edge-agent`): re-read the settings and the active model, verify the model
        # fully and switch it between two batches (modelswap.py); a bad one leaves the running model in place.
        # Settings that only apply at start make the agent stop gracefully with exit code 4, which the unit
        # restarts (RestartForceExitStatus=4).
        log.info("SIGHUP received: reloading the settings and the active model")
        agent.request_reload()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    previous[signal.SIGHUP] = signal.signal(signal.SIGHUP, on_hup)
    previous.update(_ignore_stray_signals(agent.status_line, "SIGTERM stops the agent, SIGHUP reloads it"))
    try:
        code = agent.run(stop)
    except (ConfigError, BundleError, StoreError, Busy) as e:
        _fail(str(e))
    except InferenceError as e:
        _fail(str(e), EXIT_RUNTIME)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    sys.exit(code)


# --- scan --------------------------------------------------------------------------------

@main.command()
@_settings_options
@_format_options
def scan(config_file: Path | None, fmt: str, as_json: bool, **flags: Any) -> None:
    """Screen what is in the inbox now, print a summary, and exit (0: every file got an outcome; 1: some were
    left in the inbox, named in the summary - e.g. a truncated file changed less than partial_timeout_seconds
    ago, which may still be being copied and is judged as `run` judges it)."""
    s = _load(flags, config_file)
    logsetup.setup(s.log_level)
    from .infer import InferenceError
    from .pipeline import Agent, Outcome

    quarantined: list[tuple[str, str]] = []

    def on_outcome(o: Outcome) -> None:
        if o.kind == "quarantine":
            quarantined.append((o.job.cand.rel, o.reason))

    try:
        agent = Agent(s, one_shot=True, on_outcome=on_outcome)
    except ConfigError as e:
        _fail(str(e))
    bar: Any = None
    show_bar = sys.stderr.isatty()

    def on_total(total: int) -> None:
        nonlocal bar
        if show_bar and total:
            bar = click.progressbar(length=total, label="screening", file=sys.stderr, show_pos=True)
            bar.__enter__()

    stop = threading.Event()
    # SIGTERM, SIGINT (Ctrl-C) and SIGHUP (the terminal closed) finish the images in flight and stop; files not
    # reached stay in the inbox. A second one exits at once.
    def on_signal(signum: int, frame: Any) -> None:
        if stop.is_set():
            os._exit(EXIT_RUNTIME)
        stop.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
    previous.update(_ignore_stray_signals(agent.status_line, "SIGTERM or Ctrl-C stops the scan"))
    t0 = time.monotonic()
    try:
        code = agent.scan(progress=lambda n: bar.update(n) if bar else None, on_total=on_total, stop=stop)
    except (ConfigError, BundleError, StoreError, Busy) as e:
        _fail(str(e))
    except InferenceError as e:
        _fail(str(e), EXIT_RUNTIME)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if bar is not None:
            bar.__exit__(None, None, None)
    hidden = agent.intake.hidden if getattr(agent, "intake", None) is not None else []
    report = scan_report.build(agent.counts, time.monotonic() - t0, quarantined, agent.left_in_inbox(), hidden,
                               s.partial_timeout_seconds, code)
    if fmt == "json" or as_json:
        click.echo(scan_report.as_json(report))
    else:
        for line in scan_report.text(report, hidden[0] if hidden else None):
            click.echo(line)
    if code == EXIT_INCOMPLETE:
        click.echo("edge-agent: some files in the inbox did not get an outcome (still being written, or in a "
                   "folder the agent cannot list: see \"left in the inbox\" above); run scan again", err=True)
    sys.exit(code)


# --- bench -------------------------------------------------------------------------------

@main.command()
@click.option("--inbox", "source", required=True, type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="folder of real JPEGs to benchmark on (read only: the benchmark screens copies)")
@click.option("--model", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="model bundle (default: the bundle shipped with the package)")
@click.option("--count", type=click.IntRange(min=2), default=320, show_default=True,
              help="distinct images per size (the same N for every measurement)")
@click.option("--sizes", default="source,1024x768,4000x3000", show_default=True,
              help="image sizes: 'source' (as they are) and WIDTHxHEIGHT upscaled copies the benchmark generates")
@click.option("--long", "long_count", type=click.IntRange(min=0), default=0, show_default=True,
              help="also scan this many images (all sizes mixed) and report its peak RSS; 0 skips it")
@click.option("--workdir", type=click.Path(file_okay=False, path_type=Path),
              help="scratch folder for generated images and runs (default: $TMPDIR/edge-agent-bench)")
@click.option("--threads", type=click.IntRange(min=1), help="agent setting: " + _help("threads"))
@click.option("--workers", type=click.IntRange(min=1), help="agent setting: " + _help("workers"))
@click.option("--batch-size", type=click.IntRange(min=1), help="agent setting: " + _help("batch_size"))
@click.option("--queue-max", type=click.IntRange(min=1), help="agent setting: " + _help("queue_max"))
@click.option("--naive/--no-naive", default=True, show_default=True, help="run the naive reference loop")
@click.option("--min-seconds", type=click.FloatRange(min=0), default=1.0, show_default=True,
              help="repeat each stage measured alone until it has run this long")
@click.option("--skip", type=click.IntRange(min=0), help="results excluded from the steady-state rate "
              "(default queue_max + batch_size: start-up and the queue filled while the model loads)")
@_format_options
def bench(source: Path, model: Path | None, count: int, sizes: str, long_count: int, workdir: Path | None,
          threads: int | None, workers: int | None, batch_size: int | None, queue_max: int | None, naive: bool,
          min_seconds: float, skip: int | None, fmt: str, as_json: bool) -> None:
    """System-level benchmark: scan throughput, per-stage time, naive baseline, cold start, peak RSS."""
    from .bench import dumps, parse_sizes, render, run

    try:
        parse_sizes(sizes)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--sizes") from None
    flags = {"threads": threads, "workers": workers, "batch_size": batch_size, "queue_max": queue_max}
    try:
        result = run(source, model, count, sizes, long_count, workdir, flags, naive, min_seconds, skip,
                     log=lambda m: click.echo(f"bench: {m}", err=True))
    except (ConfigError, BundleError, ValueError, RuntimeError) as e:
        _fail(str(e), EXIT_RUNTIME)
    click.echo(dumps(result) if as_json or fmt == "json" else render(result))


# --- results, quarantine, duplicates (query.py) -----------------------------------------------

def parse_since(text: str, now: datetime | None = None) -> str:
    """--since as the database compares it (query.parse_since), or a usage error naming the accepted forms."""
    from .query import parse_since as parse

    try:
        return parse(text, now)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--since") from None


def _list_options(sorts: tuple[str, ...], what: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    def deco(f: Callable[..., Any]) -> Callable[..., Any]:
        for o in reversed([
            click.option("--since", help=f"only {what} since WHEN (2h, 7d, today, 2026-11-21, ...; local time)"),
            click.option("--sort", type=click.Choice(sorts), default="newest", show_default=True,
                         help="order" + (" (risk: calibrated P(malignant), highest first)" if "risk" in sorts else "")),
            click.option("--limit", type=click.IntRange(min=1), default=None, help="at most N rows (after sorting)"),
            click.option("--utc", is_flag=True, help="show times in UTC (default: local time; the database, CSV "
                                                     "and JSON are always UTC)"),
            click.option("--format", "fmt", type=click.Choice(FORMATS), default="table", show_default=True,
                         help="ndjson: one JSON object per line, for scripts"),
        ]):
            f = o(f)
        return _db_options(f)
    return deco


def _emit(kind: str, rows: list[dict[str, Any]], fmt: str, utc: bool, conn: sqlite3.Connection) -> None:
    from . import query

    if fmt in ("json", "ndjson"):
        out = query.for_json(rows, kind)
        click.echo(json.dumps(out, indent=2, default=str) if fmt == "json" else
                   "\n".join(json.dumps(r, default=str, separators=(",", ":")) for r in out), nl=bool(out) or fmt == "json")
    elif fmt == "csv":
        out = [{**r, "where": query.where_now(r)} for r in rows]
        cols = list(out[0]) if out else [r[1] for r in conn.execute(
            "SELECT * FROM pragma_table_info(?)", (kind,))] + ["where"]
        w = csv.DictWriter(sys.stdout, fieldnames=cols, lineterminator="\n")
        w.writeheader()
        w.writerows(out)
    else:
        from tabulate import tabulate

        table, headers, what = {
            "results": (query.result_table, query.RESULT_HEADERS, "processed"),
            "quarantine": (query.quarantine_table, query.QUARANTINE_HEADERS, "quarantined"),
            "duplicates": (query.duplicate_table, query.DUPLICATE_HEADERS, "recorded")}[kind]
        cells = [[logsetup.printable(c) for c in row] for row in table(rows, utc)]  # names may hold control chars
        heads = [query.time_header(h, utc) if h == what else h for h in headers]
        click.echo(tabulate(cells, headers=heads, disable_numparse=True) if rows else f"no {kind} match")


_T = TypeVar("_T")


def _query(s: Settings, fn: Callable[[], _T]) -> _T:
    try:
        return fn()
    except sqlite3.DatabaseError as e:
        _not_ours(s.db_path, e)


@main.command()
@_list_options(SORTS, "results processed")
@click.option("--flagged", is_flag=True, help="only results that need a clinician's review")
@click.option("--label", help="only results whose top label is L: the code or the name, any case (mel, MEL, "
                              "melanoma)")
def results(db: Path | None, config_file: Path | None, flagged: bool, since: str | None, label: str | None,
            limit: int | None, sort: str, utc: bool, fmt: str) -> None:
    """List screening results, newest first: result (or "retake: <why>" for a photo that failed the quality
    check), P(malignant), review reasons and where the image is now."""
    from .query import QueryError, known_labels, query_results

    since_iso = parse_since(since) if since else None
    s, conn = _open_db(db, config_file)
    code = None
    if label is not None:
        labels = _query(s, lambda: known_labels(conn, s.model_path))
        try:
            code = labels.resolve(label)
        except QueryError as e:
            _fail(str(e))
    rows = _query(s, lambda: query_results(conn, flagged=flagged, since=since_iso, label=code, limit=limit,
                                           sort=sort))
    _emit("results", rows, fmt, utc, conn)


@main.command()
@_list_options(LIST_SORTS, "files quarantined")
def quarantine(db: Path | None, config_file: Path | None, since: str | None, limit: int | None, sort: str,
               utc: bool, fmt: str) -> None:
    """List the files the agent refused (not an image, truncated, too large, ...), why, and where they are."""
    from .query import query_quarantine

    since_iso = parse_since(since) if since else None
    s, conn = _open_db(db, config_file)
    _emit("quarantine", _query(s, lambda: query_quarantine(conn, since=since_iso, limit=limit, sort=sort)), fmt,
          utc, conn)


@main.command()
@_list_options(LIST_SORTS, "duplicates recorded")
def duplicates(db: Path | None, config_file: Path | None, since: str | None, limit: int | None, sort: str,
               utc: bool, fmt: str) -> None:
    """List the files skipped because the same image (same bytes) was screened before, and which result they
    repeat."""
    from .query import query_duplicates

    since_iso = parse_since(since) if since else None
    s, conn = _open_db(db, config_file)
    _emit("duplicates", _query(s, lambda: query_duplicates(conn, since=since_iso, limit=limit, sort=sort)), fmt,
          utc, conn)


# --- status ------------------------------------------------------------------------------

@main.command()
@_db_options
@_format_options
def status(db: Path | None, config_file: Path | None, fmt: str, as_json: bool) -> None:
    """Counts, last activity, model in use, fallbacks, the files waiting in the inbox (named, with their age and
    why they wait) and warnings (exit 1 when there is a warning)."""
    from .status import collect, render

    s, conn = _open_db(db, config_file)
    try:
        st = collect(conn, s.db_path)
    except sqlite3.DatabaseError as e:
        _not_ours(s.db_path, e)
    if as_json or fmt == "json":
        click.echo(json.dumps(st, indent=2, default=str))
    else:
        click.echo("\n".join(render(st, s.db_path, logsetup.printable)))
        for w in st["warnings"]:
            click.echo(f"WARNING: {w}", err=True)
    sys.exit(1 if st["warnings"] else 0)


# --- review (review/: the clinician web app and its static export) ----------------------------

@main.command()
@_db_options
@click.option("--inbox", type=click.Path(path_type=Path), help="the agent's inbox (processed/quarantine default to "
              "its siblings, as for `run`)")
@click.option("--processed-dir", type=click.Path(path_type=Path), help=_help("processed_dir"))
@click.option("--quarantine-dir", type=click.Path(path_type=Path), help=_help("quarantine_dir"))
@click.option("--model", type=click.Path(path_type=Path), help="model bundle for heatmaps (default: as `run`)")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="address to listen on; keep the loopback address: the app has no login")
@click.option("--port", type=click.IntRange(1, 65535), default=8765, show_default=True, help="TCP port")
@click.option("--export", "export_dir", type=click.Path(file_okay=False, path_type=Path),
              help="instead of serving, write a static HTML worklist (thumbnails, heatmaps, probabilities) into DIR")
@click.option("--limit", type=click.IntRange(min=1), default=200, show_default=True,
              help="--export: at most N cases, highest risk first")
@click.option("--all", "include_all", is_flag=True, help="--export: include results that were not flagged")
def review(db: Path | None, config_file: Path | None, inbox: Path | None, processed_dir: Path | None,
           quarantine_dir: Path | None, model: Path | None, host: str, port: int, export_dir: Path | None,
           limit: int, include_all: bool) -> None:
    """Clinician review: a local web app (worklist by risk, case page with heatmap, verdicts, quarantine,
    CSV/JSON export) at http://127.0.0.1:8765/, or with --export DIR a static HTML worklist. Needs the
    [review] extra (pip install 'edge-derm-screen[review]'). See docs/review.md."""
    from .review.cli import serve_or_export

    s = _load({"db": db, "inbox": inbox, "processed_dir": processed_dir, "quarantine_dir": quarantine_dir,
               "model": model}, config_file)
    try:
        serve_or_export(s, host, port, export_dir, limit, include_all, echo=click.echo)
    except (ConfigError, StoreError, RuntimeError) as e:
        _fail(str(e))


# --- prune (retention.py) ----------------------------------------------------------------------

@main.command()
@click.option("--dry-run", is_flag=True, help="list what would be removed; remove nothing")
@click.option("--config", "config_file", type=click.Path(path_type=Path), help="TOML settings file of the agent")
@click.option("--db", type=click.Path(path_type=Path), help=_help("db"))
@click.option("--inbox", type=click.Path(path_type=Path), help=_help("inbox") + " (locates the default folders)")
@click.option("--processed-dir", type=click.Path(path_type=Path), help=_help("processed_dir"))
@click.option("--quarantine-dir", type=click.Path(path_type=Path), help=_help("quarantine_dir"))
@click.option("--keep-processed-days", type=float, help=_help("keep_processed_days"))
@click.option("--keep-quarantine-days", type=float, help=_help("keep_quarantine_days"))
@click.option("--prune-free-mb", type=float, help=_help("prune_free_mb"))
@_format_options
def prune(dry_run: bool, config_file: Path | None, fmt: str, as_json: bool, **flags: Any) -> None:
    """Apply the retention settings now (the daemon does it every prune_seconds): remove stored images and
    quarantined files older than keep_*_days, or the oldest below the prune_free_mb watermark. Only files a
    database row says the agent stored there, with the row's content; rows stay, marked pruned."""
    from .retention import Policy, prune as run_prune

    s = _load(flags, config_file)
    policy = Policy(s.keep_processed_days, s.keep_quarantine_days, s.prune_free_mb)
    if not policy.active:
        _fail("no retention is configured: set keep_processed_days, keep_quarantine_days or prune_free_mb (config "
              "file or --keep-processed-days ...); nothing was removed", EXIT_INCOMPLETE)
    logsetup.setup("WARNING")
    try:
        rep = run_prune(s.db_path, s.processed_path, s.quarantine_path, policy, dry_run=dry_run)
    except (StoreError, ConfigError) as e:
        _fail(str(e))
    except sqlite3.DatabaseError as e:
        _not_ours(s.db_path, e)
    if as_json or fmt == "json":
        click.echo(json.dumps({"dry_run": dry_run, **rep.to_dict()}, indent=2))
        return
    if dry_run:
        for p in rep.would_remove:
            click.echo(f"would remove {logsetup.printable(p)}")
        click.echo(f"dry run: {len(rep.would_remove)} file(s), {rep.removed_bytes / 2**20:.1f} MiB would be removed")
    else:
        click.echo(f"removed {rep.removed} file(s), {rep.removed_bytes / 2**20:.1f} MiB; {rep.missing} were already "
                   "gone (marked missing)")
    for p, why in rep.skipped:
        click.echo(f"left alone: {logsetup.printable(p)}: {why}", err=True)


# --- backup (backup.py) ------------------------------------------------------------------------

@main.command()
@click.option("--to", "to", required=True, type=click.Path(path_type=Path),
              help="backup file, or a folder for a time-stamped results-YYYYmmddTHHMMSSZ.db")
@click.option("--keep", type=click.IntRange(min=0), default=0, show_default=True,
              help="with a folder: keep only the newest N backups there (0: keep all)")
@_db_options
def backup(to: Path, keep: int, db: Path | None, config_file: Path | None) -> None:
    """Copy the results database consistently while the agent writes (SQLite online backup), check the copy
    (integrity_check) and put it in place atomically. Restore: docs/operations.md."""
    from .backup import BackupError, backup as run_backup

    s = _load({"db": db}, config_file)
    try:
        refuse_inside_inbox("the backup --to", to, s, s.db_path)
    except ConfigError as e:
        _fail(str(e))
    try:
        r = run_backup(s.db_path, to, keep)
    except (BackupError, StoreError) as e:
        _fail(str(e), EXIT_RUNTIME)
    click.echo(f"backed up {s.db_path} to {r.path}: {r.size / 2**20:.1f} MiB, {r.results} results, schema "
               f"v{r.schema_version}, integrity_check ok")
    for p in r.removed:
        click.echo(f"removed old backup {p}")


# --- model -------------------------------------------------------------------------------

@main.group()
def model() -> None:
    """Show or check a model bundle (default: the bundle shipped with the package)."""


def _bundle_arg(bundle: Path | None) -> Path:
    path = bundle or default_bundle_path()
    if bundle is None and not path.exists():
        _fail(f"no bundle installed at {path}: pass a bundle folder (edge-agent model info PATH)")
    return path


def _trust_options(f: Callable[..., Any]) -> Callable[..., Any]:
    """The bundle-trust settings of `run`/`scan`, so `model verify` answers exactly as the agent would."""
    for o in reversed([_SPECIAL["trusted_keys"], _SPECIAL["allow_unsigned_bundle"],
                       click.option("--config", "config_file", type=click.Path(path_type=Path),
                                    help="TOML settings file (trusted_keys, allow_unsigned_bundle)")]):
        f = o(f)
    return f


def _verify_with_trust(path: Path, config_file: Path | None, trusted_keys: tuple[Path, ...],
                       allow_unsigned_bundle: bool | None) -> Any:
    from .signing import trust_from_settings

    s = _load({"trusted_keys": trusted_keys, "allow_unsigned_bundle": allow_unsigned_bundle}, config_file)
    try:
        trust = trust_from_settings(s)
    except ConfigError as e:
        _fail(str(e))
    return verify_bundle(path, trust)


def _items(x: Any) -> list[tuple[Any, Any]]:
    return list(x.items()) if isinstance(x, dict) else []


def _signature_line(rep: Any) -> str:
    sig = rep.signature
    if sig is None:
        return "-"
    return f"{sig.status.upper()}: {sig.message}" if not sig.valid else f"valid, {sig.message}"


@model.command()
@click.argument("bundle", required=False, type=click.Path(path_type=Path))
@click.option("--calibration", type=click.Path(path_type=Path), help="site calibration file to show (default: "
              "the `calibration` setting, else BUNDLE.site-calibration.json beside the bundle if present)")
@_format_options
@_trust_options
def info(bundle: Path | None, calibration: Path | None, fmt: str, as_json: bool, config_file: Path | None,
         trusted_keys: tuple[Path, ...], allow_unsigned_bundle: bool | None) -> None:
    """Show a bundle: id, labels, variants, thresholds, gate verdict, signature and checksum status, and the site
    calibration in force next to the bundle's own numbers."""
    as_json = as_json or fmt == "json"
    rep = _verify_with_trust(_bundle_arg(bundle), config_file, trusted_keys, allow_unsigned_bundle)
    m = rep.manifest or {}
    cal, cal_error = _active_calibration(rep, calibration, config_file)
    if as_json:
        click.echo(json.dumps({**rep.to_dict(), "manifest": m, "calibration": cal.doc if cal else None,
                               "calibration_path": str(cal.path) if cal else None, "calibration_error": cal_error},
                              indent=2, default=str))
        sys.exit(0 if rep.ok and not cal_error else 1)
    # The manifest may be damaged or hostile: show what it says (as text), never trust its types here.
    gate = m.get("gate") if isinstance(m.get("gate"), dict) else {}
    names = m.get("label_names") if isinstance(m.get("label_names"), dict) else {}
    labels = m.get("labels") if isinstance(m.get("labels"), list) else []
    high = m.get("high_risk_labels") if isinstance(m.get("high_risk_labels"), list) else []
    click.echo(f"bundle:        {rep.path}")
    click.echo(f"model id:      {m.get('model_id', '-')!s} (format v{m.get('format_version', '-')!s}, created "
               f"{m.get('created_at', '-')!s})")
    click.echo(f"labels:        {', '.join(f'{x} ({names[x]})' if isinstance(x, str) and x in names else str(x) for x in labels)}")
    click.echo(f"high risk:     {', '.join(str(x) for x in high)}")
    for v, spec in _items(m.get("models")):
        spec = spec if isinstance(spec, dict) else {}
        role = "primary" if v == m.get("primary") else "fallback" if v == m.get("fallback") else "spare"
        click.echo(f"model {v:<8} {spec.get('file')} - {'approved' if spec.get('approved') is True else 'NOT approved'}, {role}")
    click.echo(f"temperature:   {m.get('temperature', '-')!s}")
    for name, spec in _items(m.get("thresholds")):
        if isinstance(spec, dict) and isinstance(spec.get("labels"), list):
            click.echo(f"threshold:     {name}: P({'+'.join(str(x) for x in spec['labels'])}) >= {spec.get('probability')} -> high_risk")
        elif name == "low_confidence" and isinstance(spec, dict):
            click.echo(f"threshold:     low_confidence: top-1 probability < {spec.get('top1_probability')}")
    if cal is not None:
        t = cal.doc["temperature"]
        click.echo(f"calibration:   {cal.calibration_id} ({cal.path}), made {cal.doc.get('created_at')} by "
                   f"{cal.doc.get('created_by')} on {cal.doc.get('data', {}).get('cases')} cases")
        click.echo(f"  temperature: {cal.temperature:.4g} [{_ci_text(t.get('ci95'))}] (bundle {m.get('temperature', '-')!s})")
        for name, spec in cal.doc["thresholds"].items():
            site = spec.get("site_calibrated", {})
            click.echo(f"  threshold:   {name}: {spec['probability']:g} [{_ci_text(spec.get('ci95'))}] (bundle "
                       f"{spec.get('bundle')}); site sensitivity {site.get('sensitivity')} "
                       f"[{_ci_text(site.get('sensitivity_ci95'))}]{'  LOOSER than the bundle' if spec.get('looser') else ''}")
    elif cal_error:
        click.echo(f"calibration:   REFUSED: {cal_error}")
    else:
        click.echo("calibration:   none (the bundle's own temperature and thresholds)")
    click.echo(f"gate:          {'APPROVED' if gate.get('approved') else 'REJECTED' if gate else '-'}"
               f"{': ' + str(gate.get('reason')) if gate.get('reason') else ''}")
    click.echo(f"ood check:     {_ood_line(m)}")
    click.echo(f"heatmaps:      {'yes (feature output ' + repr(m['features'].get('output')) + ')' if isinstance(m.get('features'), dict) else 'no: the bundle (format ' + str(m.get('format_version')) + ') has no feature output'}")
    if m.get("license"):
        click.echo(f"license:       {m['license']!s}")
    click.echo(f"manifest:      sha256 {rep.manifest_sha256 or '-'}")
    click.echo(f"signature:     {_signature_line(rep)}")
    click.echo(f"checksums:     {'all ' + str(len(rep.files)) + ' files ok' if rep.ok else 'PROBLEMS (see below)'}")
    for e in rep.errors:
        click.echo(f"ERROR: {e}", err=True)
    for w in rep.warnings:
        click.echo(f"warning: {w}", err=True)
    sys.exit(0 if rep.ok and not cal_error else 1)


def _ci_text(ci: Any) -> str:
    return ", ".join("-" if v is None else f"{v:.4g}" for v in ci) if isinstance(ci, list) and len(ci) == 2 else "-"


def _active_calibration(rep: Any, path: Path | None, config_file: Path | None) -> tuple[Any, str | None]:
    """The site calibration the agent would apply with this bundle (None, None: none), or why it is refused."""
    from .bundle import load_bundle
    from .site_calibration import CalibrationError, resolve

    if not rep.ok:
        return None, None
    if path is None:
        path = _load({}, config_file).calibration
    try:
        return resolve(path, load_bundle(rep.path, rep.trust)), None
    except (CalibrationError, BundleError) as e:
        return None, str(e)


def _ood_line(m: dict) -> str:
    ood = m.get("ood")
    if not isinstance(ood, dict):
        return (f"off: the bundle (format {m.get('format_version')}) has no out-of-distribution statistics, so images "
                "unlike the training data are not flagged as such (build-model upgrade-bundle adds them)")
    th = ood.get("thresholds") or {}
    flagged = {v: x.get("val_flagged") for v, x in ((ood.get("fit") or {}).get("variants") or {}).items()}
    return (f"{ood.get('method')}, flag above " + ", ".join(f"{v} {t}" for v, t in sorted(th.items()))
            + (f" (flags {flagged.get(m.get('primary'), 0):.1%} of the build's validation images)"
               if isinstance(flagged.get(m.get("primary")), (int, float)) else ""))


@model.command()
@click.argument("bundle", required=False, type=click.Path(path_type=Path))
@click.option("--load/--no-load", default=True, show_default=True,
              help="also open every model variant in onnxruntime and run one zero image through it")
@_format_options
@_trust_options
def verify(bundle: Path | None, load: bool, fmt: str, as_json: bool, config_file: Path | None, trusted_keys: tuple[Path, ...],
           allow_unsigned_bundle: bool | None) -> None:
    """Check a bundle: signature, format version, checksums, unlisted files, labels, thresholds, gate; exit 1 on
    problems."""
    as_json = as_json or fmt == "json"
    rep = _verify_with_trust(_bundle_arg(bundle), config_file, trusted_keys, allow_unsigned_bundle)
    if rep.ok and load:
        _check_loads(rep)
    if as_json:
        click.echo(json.dumps(rep.to_dict(), indent=2, default=str))
    else:
        for name, state in sorted(rep.files.items()):
            click.echo(f"{state:>9}  {name}")
        click.echo(f"signature: {_signature_line(rep)}")
        click.echo(f"manifest sha256: {rep.manifest_sha256 or '-'}")
        for e in rep.errors:
            click.echo(f"ERROR: {e}")
        for w in rep.warnings:
            click.echo(f"warning: {w}")
        click.echo(f"{rep.path}: {'OK' if rep.ok else 'REJECTED'}")
    sys.exit(0 if rep.ok else 1)


def _check_loads(rep: Any) -> None:
    import numpy as np

    from .bundle import load_bundle
    from .infer import Engine, _short

    b = load_bundle(rep.path, rep.trust)
    x = np.zeros((1, 3, b.input_size, b.input_size), np.float32)
    for variant in b.variants:
        eng = Engine(b)
        try:
            eng._session, eng.variant = eng._open(variant), variant
            eng._run(eng._session, x)
        except Exception as e:
            role = "primary" if variant == b.primary else "fallback" if variant == b.fallback else "spare"
            msg = f"the {variant} model ({role}) does not run in onnxruntime here: {_short(e)}"
            if variant == b.primary and b.fallback is None or variant == b.fallback:
                rep.errors.append(msg + "; rebuild the bundle")
            else:
                rep.warnings.append(msg + (f"; the agent would fall back to {b.fallback}" if variant == b.primary else ""))


# --- calibrate (site_calibration.py) ----------------------------------------------------------

@main.command()
@click.option("--csv", "csv_path", type=click.Path(path_type=Path), help="the site's labelled cases: lines FILE,LABEL "
              "(label code or name; paths relative to the CSV); screened with the agent's own decode and model")
@click.option("--from-reviews", is_flag=True, help="use the diagnosis/histopathology verdicts recorded in the "
              "database's reviews (needs --db)")
@click.option("--db", type=click.Path(path_type=Path), help="results database (or EDGE_AGENT_DB): reviews source, "
              "and where a loosening is recorded as an event")
@click.option("--model", type=click.Path(path_type=Path), help="model bundle (default: the bundle shipped with the package)")
@click.option("--out", type=click.Path(path_type=Path), help="calibration file to write (default: "
              "BUNDLE.site-calibration.json beside the bundle folder, which the agent loads by itself)")
@click.option("--target", type=click.FloatRange(0.5, 0.999), help="sensitivity every high-risk rule must reach on "
              "the site's cases (default: each rule's target in the bundle, 0.95)")
@click.option("--allow-looser", is_flag=True, help="allow thresholds that flag fewer of the site's cases than the "
              "bundle's (needs a clinician's approval; logged, and announced at every agent start)")
@click.option("--bootstrap", "reps", type=click.IntRange(100, 100_000), default=1000, show_default=True,
              help="bootstrap resamples for the 95% intervals")
@click.option("--seed", type=int, default=0, show_default=True, help="bootstrap seed")
@click.option("--by", help="who calibrated (recorded in the file; default USER@HOST)")
@click.option("--dry-run", is_flag=True, help="fit and show, write nothing")
@_format_options
@_trust_options
def calibrate(csv_path: Path | None, from_reviews: bool, db: Path | None, model: Path | None, out: Path | None,
              target: float | None, allow_looser: bool, reps: int, seed: int, by: str | None, dry_run: bool, fmt: str,
              as_json: bool, config_file: Path | None, trusted_keys: tuple[Path, ...],
              allow_unsigned_bundle: bool | None) -> None:
    """Re-fit the temperature and the review thresholds on this site's labelled cases so that every high-risk
    rule reaches its target sensitivity here; writes a checksummed site calibration file beside the bundle
    (never into it) that the agent verifies and applies at start. Exit 0 written, 1 too few positives, 2 bad
    input."""
    from .bundle import load_bundle
    from .signing import trust_from_settings
    from .site_calibration import CalibrationError, TooFewPositives, calibrate as run_calibration, default_path, \
        record_event, render, write_atomic

    if (csv_path is None) == (not from_reviews):
        _fail("pass exactly one of --csv FILE (file,label lines) or --from-reviews (verdicts in the database)")
    s = _load({"db": db, "model": model, "trusted_keys": trusted_keys,
               "allow_unsigned_bundle": allow_unsigned_bundle}, config_file)
    logsetup.setup("WARNING")
    try:
        bundle = load_bundle(s.model_path, trust_from_settings(s))
    except (BundleError, ConfigError) as e:
        _fail(str(e))
    as_json = as_json or fmt == "json"
    say = (lambda m: click.echo(m, err=True)) if as_json else click.echo
    try:
        doc = run_calibration(bundle, csv_path=csv_path, db_path=s.db if from_reviews else None, settings=s,
                              target=target, allow_looser=allow_looser, reps=reps, seed=seed, by=by,
                              command=" ".join(["edge-agent", *sys.argv[1:]]), say=say)
    except TooFewPositives as e:
        _fail(str(e), EXIT_INCOMPLETE)
    except CalibrationError as e:
        _fail(str(e))
    path = out or default_path(bundle.path)
    if not dry_run:
        try:
            write_atomic(path, doc)
        except CalibrationError as e:
            _fail(str(e))
    if as_json:
        click.echo(json.dumps({**doc, "path": str(path), "written": not dry_run}, indent=2))
    else:
        click.echo("\n".join(render(doc)))
        click.echo(f"{'would write (dry run)' if dry_run else 'wrote'} {path}" +
                   ("" if dry_run or out is None else " - set `calibration` to this path for the agent to use it"))
    if doc["loosened"] and not dry_run:
        msg = (f"site calibration {doc['calibration_id']} makes rule(s) {', '.join(doc['loosened'])} LESS STRICT "
               f"than the bundle's (--allow-looser, by {doc['created_by']}); written to {path}")
        log.warning("%s", msg)
        click.echo(f"WARNING: {msg}", err=True)
        record_event(s.db, "calibration_loosened", msg)
    sys.exit(0)


# --- model activate / rollback (modelswap.py) ---------------------------------------------------

def _swap_options(f: Callable[..., Any]) -> Callable[..., Any]:
    for o in reversed([
        click.option("--db", type=click.Path(path_type=Path), help="results database of the agent (or EDGE_AGENT_DB); "
                     "the active-model pointer lives beside it"),
        click.option("--reload/--no-reload", "reload_", default=True, show_default=True,
                     help="signal the running agent (SIGHUP) and wait for it to switch"),
        click.option("--wait", type=click.FloatRange(min=0), default=120, show_default=True,
                     help="seconds to wait for the running agent to report the switch"),
        _SPECIAL["trusted_keys"], _SPECIAL["allow_unsigned_bundle"],
        click.option("--config", "config_file", type=click.Path(path_type=Path),
                     help="TOML settings file of the agent (db, inbox, trust, thresholds, providers)"),
    ]):
        f = o(f)
    return f


def _swap(action: str, config_file: Path | None, flags: dict[str, Any], reload_: bool, wait: float,
          bundle: Path | None = None) -> NoReturn:
    from . import modelswap

    logsetup.setup("WARNING")
    s = _load(flags, config_file)
    ptr = modelswap.pointer_path(s.db_path)
    try:
        if bundle is not None:
            refuse_inside_inbox("the bundle", bundle, s, s.db_path)
        saved = modelswap.read_pointer(ptr) if ptr.exists() else None
        cand, _ = modelswap.activate(s, bundle) if bundle is not None else modelswap.rollback(s)
    except (modelswap.SwapRejected, ConfigError, StoreError) as e:
        _fail(f"{e}; the active model is unchanged", EXIT_INCOMPLETE)
    b = cand.bundle
    click.echo(f"verified {b.model_id} ({b.path}): checksums, signature, format, gate, test inference on "
               f"{cand.variant}: ok")
    click.echo(f"{action}: {ptr} now names {b.model_id}")
    if not reload_:
        click.echo("not signalled (--no-reload): `systemctl reload edge-agent` switches the running agent")
        sys.exit(0)
    result, msg = modelswap.tell_daemon(s.db_path, b.manifest_sha256, wait)
    click.echo(msg)
    if result == "rejected":
        if saved is None:
            ptr.unlink(missing_ok=True)
        else:
            modelswap.write_pointer(ptr, saved)
        _fail(f"the running agent did not switch ({msg}); the pointer was restored, the running model is unchanged",
              EXIT_RUNTIME)
    sys.exit(EXIT_RUNTIME if result == "no-permission" else 0)


@model.command()
@click.argument("bundle", type=click.Path(path_type=Path))
@_swap_options
def activate(bundle: Path, db: Path | None, reload_: bool, wait: float, trusted_keys: tuple[Path, ...],
             allow_unsigned_bundle: bool | None, config_file: Path | None) -> None:
    """Verify BUNDLE fully (checksums, signature, format, gate, a test inference) and make it the active model;
    the running agent switches to it between two batches. Exit 0: active (or active at the next start when the
    agent is not running); 1: the bundle was rejected, nothing changed; 3: the running agent did not switch."""
    _swap("activated", config_file, {"db": db, "trusted_keys": trusted_keys,
                                     "allow_unsigned_bundle": allow_unsigned_bundle}, reload_, wait, bundle)


@model.command()
@_swap_options
def rollback(db: Path | None, reload_: bool, wait: float, trusted_keys: tuple[Path, ...],
             allow_unsigned_bundle: bool | None, config_file: Path | None) -> None:
    """Return to the model that was active before the last activation (verified like any activation)."""
    _swap("rolled back", config_file, {"db": db, "trusted_keys": trusted_keys,
                                       "allow_unsigned_bundle": allow_unsigned_bundle}, reload_, wait)


# --- backfill, backfill-merge (edge_agent/backfill, docs/backfill.md; needs the [scale] extra) --------------

_BACKFILL_SETTINGS = ("model", "trusted_keys", "allow_unsigned_bundle", "thresholds", "threshold_override",
                      "providers", "threads", "batch_size", "spot_check_fraction", "max_pixels", "max_file_mb",
                      "min_sharpness", "min_brightness", "max_brightness", "max_clipped_fraction", "log_level")


def _backfill_settings_options(f: Callable[..., Any]) -> Callable[..., Any]:
    """The screening settings of `scan` (same flags, environment and config file), without the inbox ones."""
    opts = []
    for name in _BACKFILL_SETTINGS:
        fld = FIELDS[name]
        if name in _SPECIAL:
            opts.append(_SPECIAL[name])
        elif "Path" in str(fld.type):
            opts.append(click.option(_flag(name), name, type=click.Path(path_type=Path), help=_help(name)))
        else:
            opts.append(click.option(_flag(name), name, type=_FLAG_TYPES[str(fld.type)], help=_help(name)))
    opts.append(click.option("--config", "config_file", type=click.Path(path_type=Path),
                             help="TOML settings file (or EDGE_AGENT_CONFIG): the screening settings of `scan`"))
    for o in reversed(opts):
        f = o(f)
    return f


def _need_scale() -> None:
    try:
        import pyarrow  # noqa: F401
        import ray  # noqa: F401
    except ImportError as e:
        _fail(f"the backfill needs Ray Data and pyarrow ({e}); install the extra: pip install "
              "'edge-derm-screen[scale]'")


@main.command()
@click.argument("source")
@click.option("--manifest", is_flag=True, help="SOURCE is a text file with one path or URI per line (s3://, gs://, "
              "file://; relative paths from the manifest's folder) instead of a folder to walk")
@click.option("-o", "--output", required=True, help="output folder (local, shared, or an object-store URI): "
              "partitioned Parquet and the backfill's state; give the same one to resume")
@click.option("--actors", type=click.IntRange(min=1), default=1, show_default=True,
              help="screening actors (worker processes), each with its own model session and decoder process")
@click.option("--actor-cpus", type=click.FloatRange(min=0.1), default=1.0, show_default=True,
              help="CPUs Ray reserves per actor (and the default --threads)")
@click.option("--batch-rows", type=click.IntRange(min=1, max=4096), default=16, show_default=True,
              help="inputs per actor call (ONNX batches of --batch-size inside it)")
@click.option("--rows-per-file", type=click.IntRange(min=1), default=1000, show_default=True,
              help="at least this many rows per Parquet file; what a stop loses and redoes is at most this many "
                   "per writer")
@click.option("--address", help="an existing Ray cluster ('auto', or ray://HEAD:10001); default: start a local one")
@click.option("--num-cpus", type=click.IntRange(min=1), help="a local cluster's CPUs (default: this machine's)")
@click.option("--object-store-mb", type=click.IntRange(min=80), help="a local cluster's object store (default: Ray's)")
@click.option("--dashboard/--no-dashboard", default=False, show_default=True,
              help="start Ray's dashboard with a local cluster (progress per operator, at http://127.0.0.1:8265)")
@_backfill_settings_options
def backfill(source: str, manifest: bool, output: str, actors: int, actor_cpus: float, batch_rows: int,
             rows_per_file: int, address: str | None, num_cpus: int | None, object_store_mb: int | None,
             dashboard: bool, config_file: Path | None, **flags: Any) -> None:
    """Screen an archive (a folder tree, or --manifest FILE) on Ray with the agent's own decode, model and
    triage; rows as Parquet in --output (exit 0: every input has a row). The archive is only read. Stopped or
    killed, the same command resumes where the written rows end. Then: edge-agent backfill-merge OUTPUT --db DB."""
    _need_scale()
    flags["threads"] = flags.get("threads") or max(1, int(actor_cpus))
    s = _load(flags, config_file)
    logsetup.setup(s.log_level)
    from .backfill.output import BackfillError, BackfillFailed
    from .backfill.run import Options, run_backfill
    from .infer import InferenceError

    opts = Options(actors=actors, actor_cpus=actor_cpus, batch_rows=batch_rows, rows_per_file=rows_per_file,
                   address=address, num_cpus=num_cpus, object_store_mb=object_store_mb, dashboard=dashboard)
    try:
        sm = run_backfill(source, output, s, manifest=manifest, opts=opts, echo=lambda t: click.echo(t, err=True))
    except (ConfigError, BundleError, BackfillError) as e:
        _fail(str(e))
    except (InferenceError, BackfillFailed, OSError) as e:
        _fail(str(e), EXIT_RUNTIME)
    w = sm.written
    assert w is not None
    for note in sm.notes:
        click.echo(f"  note: {note}")
    rate = (sm.screened + sm.quarantined) / sm.seconds if sm.seconds else 0.0
    click.echo(f"backfill: {len(w.keys)} of {sm.entries} inputs written to {output} ({w.results} results, "
               f"{w.quarantined} quarantined); this run: {sm.screened} screened, {sm.quarantined} quarantined in "
               f"{sm.seconds:.1f} s ({rate:.1f} images/s"
               + (f"; {sm.steady_rate:.1f} images/s after start-up)" if sm.steady_rate else ")"))
    if w.repeated:
        click.echo(f"  {w.repeated} row(s) were written twice (a late write of a stopped run on an object store, or a "
                   "re-run task); the merge keeps one")
    click.echo(f"  merge into a results database: edge-agent backfill-merge {output} --db DB")
    sys.exit(0 if len(w.keys) >= sm.entries else EXIT_INCOMPLETE)


@main.command("backfill-merge")
@click.argument("output")
@_db_options
def backfill_merge(output: str, db: Path | None, config_file: Path | None) -> None:
    """Merge a backfill's Parquet rows into a results database (created if missing), keyed by sha256: merging
    again, or after a resumed backfill, never adds a row twice. Takes the database's lock (stop the agent
    that uses it, or merge into another database)."""
    _need_scale()
    s = _load({"db": db}, config_file)
    from .backfill.merge import merge
    from .backfill.output import BackfillError
    from .share import resolve_share

    try:
        m = merge(output, s.db_path, resolve_share(s.share_group))
    except (ConfigError, BackfillError, StoreError, Busy) as e:
        _fail(str(e))
    click.echo(f"merged {m.files} file(s) from {output} into {s.db_path}: {m.results} results, {m.duplicates} "
               f"duplicates, {m.quarantined} quarantined, {m.already} already there")


if __name__ == "__main__":  # pragma: no cover
    main()
