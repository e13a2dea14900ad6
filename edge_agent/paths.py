"""Resolve the configured paths once, at start, to real paths, and refuse layouts that loop.

Why: the agent moves everything it finds in the inbox. A database inside the
inbox would be moved into quarantine by its own agent (and its `-wal` file
looped on for ever); a processed or quarantine folder inside the inbox (given
directly, or reached through a symlinked inbox whose real path contains it)
would have its files screened again at every rescan; a bundle inside the
inbox would be screened and moved away under the running model. Comparing
real paths (symlinks resolved) catches every spelling of the same place.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from .config import ConfigError, Settings


@dataclass(frozen=True)
class SitePaths:
    """The agent's folders and files, as real paths."""

    inbox: Path
    db: Path
    model: Path
    processed: Path
    quarantine: Path


def real(p: Path) -> Path:
    """The real path of p, resolving symlinks as far as the path exists (a missing tail is kept)."""
    return Path(os.path.realpath(os.path.abspath(os.path.expanduser(p))))


def inside(p: Path, folder: Path) -> bool:
    return p == folder or p.is_relative_to(folder)


def check_layout(s: Settings, config: Path | None = None) -> None:
    """Refuse output folders that contain the inbox, and anything the agent writes or reads as its own
    (database and its side files, bundle, processed and quarantine folders, trusted keys, site calibration,
    the settings file `config`) inside the inbox."""
    if s.inbox is None:
        return
    inbox = real(s.inbox)
    for name in ("processed_dir", "quarantine_dir"):
        out = real(getattr(s, name.replace("_dir", "_path")))
        if inside(inbox, out):
            raise ConfigError(f"{name} {out} is the inbox or contains it; choose a folder outside the inbox (the "
                              "default is a sibling of the inbox)")
    own: list[tuple[str, Path | None]] = [
        ("processed_dir", real(s.processed_path)), ("quarantine_dir", real(s.quarantine_path)),
        ("db", real(s.db) if s.db is not None else None), ("model", real(s.model) if s.model is not None else None),
        ("metrics_file", real(s.metrics_file) if getattr(s, "metrics_file", None) is not None else None)]
    own += [("trusted_keys", real(k)) for k in getattr(s, "trusted_keys", ())]
    if getattr(s, "calibration", None) is not None:
        own.append(("calibration", real(s.calibration)))
    if config is not None:
        own.append(("config file", real(config)))
    for name, p in own:
        if p is not None and inside(p, inbox):
            what = {"db": "the database (the agent would screen and move its own database files)",
                    "model": "the model bundle (the agent would screen and move its own model)",
                    "trusted_keys": "a key the agent trusts (it would be quarantined as not an image, and anyone "
                                    "who may drop files in the inbox could replace it)",
                    "calibration": "the site calibration (the agent would screen and move it away)",
                    "config file": "the agent's settings (it would screen and move its own settings, and anyone "
                                   "who may drop files in the inbox could change them)"}.get(
                name, "an output folder (its files would be screened again at every rescan)")
            raise ConfigError(f"{name} {p} is inside the inbox {inbox}: that is {what}; put it outside the inbox")
    processed, quarantine = real(s.processed_path), real(s.quarantine_path)
    if inside(processed, quarantine) or inside(quarantine, processed):
        raise ConfigError(f"processed_dir {processed} and quarantine_dir {quarantine} are the same folder or one is "
                          "inside the other: screened images and refused files would mix (retention, `results` and "
                          "`quarantine` would act on the wrong files); give them two separate folders")


def resolve(s: Settings) -> SitePaths:
    """Check the layout and return the real paths; ConfigError with what to fix otherwise."""
    inbox = s.inbox_dir
    db = s.db_path
    if not os.path.isdir(inbox):
        raise ConfigError(f"inbox {inbox} does not exist or is not a folder: create it or fix --inbox")
    check_layout(s)
    dbr = real(db)
    if os.path.isdir(dbr):
        raise ConfigError(f"--db {db} is a folder; pass the database file's path, e.g. {Path(db) / 'results.db'}")
    return SitePaths(inbox=real(inbox), db=dbr, model=real(s.model_path), processed=real(s.processed_path),
                     quarantine=real(s.quarantine_path))


def known_inboxes(s: Settings, db: Path | None = None) -> list[Path]:
    """Every inbox this database is screened from, as real paths: the configured one (flags, environment,
    config file) and the one the agent last recorded in the database (agent_state), for commands such as
    `backup` and `model activate` that are given only --db."""
    found = [real(s.inbox)] if s.inbox is not None else []
    db = db if db is not None else s.db
    if db is not None and os.path.isfile(db):
        import sqlite3

        try:
            conn = sqlite3.connect(f"file:{real(db)}?mode=ro", uri=True, timeout=5)
            try:
                row = conn.execute("SELECT value FROM agent_state WHERE key = 'inbox'").fetchone()
            finally:
                conn.close()
        except sqlite3.Error:
            row = None
        if row and row[0]:
            found.append(real(Path(row[0])))
    return found


def refuse_inside_inbox(what: str, p: Path, s: Settings, db: Path | None = None) -> None:
    """ConfigError when p (a backup, a bundle to activate) is inside an inbox of this agent: the agent would
    screen it as an image, quarantine it and move it away (a bundle from under the running model)."""
    target = real(p)
    for inbox in known_inboxes(s, db):
        if inside(target, inbox):
            raise ConfigError(f"{what} {target} is inside the inbox {inbox}: the agent would screen it, refuse it "
                              "as not an image and move it into quarantine; put it outside the inbox")
