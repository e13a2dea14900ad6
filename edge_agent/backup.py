"""`edge-agent backup`: a consistent copy of the results database, taken while the agent writes.

Why SQLite's online backup API: it copies the database page by page from one read transaction (a
snapshot), so rows the agent commits meanwhile are either wholly in the copy or not at all, and the agent
is never blocked (WAL: readers and the writer do not wait for each other). The copy is written to a
temporary file beside the target, checked with `PRAGMA integrity_check`, switched to a self-contained
rollback-journal file (no -wal to forget), fsynced and renamed into place: the target is either the old
backup or a complete, checked new one, never half a file.

Restoring (docs/operations.md): stop the agent, move results.db and its -wal/-shm aside, copy the backup to
results.db, start the agent. Images screened after the backup are no longer in the inbox (they were moved),
so none is screened twice; one sent again is a duplicate if its result is in the backup.
"""
from __future__ import annotations

import os
import sqlite3
import tempfile
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from .paths import real
from .store import APPLICATION_ID, StoreError, connect

PAGES_PER_STEP = -1  # one step: one read snapshot (WAL: the agent keeps writing); steps would restart on every commit
PREFIX = "results-"


class BackupError(RuntimeError):
    """The backup could not be taken or failed its check; the message says what to do."""


@dataclass
class BackupResult:
    path: Path
    size: int
    results: int
    schema_version: int
    removed: list[Path]


def _target(db: Path, to: Path) -> Path:
    if to.is_dir():
        stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        return to / f"{PREFIX}{stamp}.db"
    return to


def backup(db: Path, to: Path, keep: int = 0) -> BackupResult:
    """Copy `db` to `to` (a file, or a folder for a time-stamped file; keep>0 then removes all but the newest
    `keep` backups there). Raises BackupError/StoreError with the reason."""
    target = _target(db, to)
    dbr = real(db)
    if real(target) in (dbr, Path(f"{dbr}-wal"), Path(f"{dbr}-shm")):
        raise BackupError(f"--to {to} is the database itself; give another file or a folder")
    if not target.parent.is_dir():
        raise BackupError(f"the folder {target.parent} does not exist; create it (e.g. /var/lib/edge-agent/backups, "
                          "0700, owned by the agent's user)")
    src = connect(db, readonly=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        os.chmod(tmp, 0o600)  # patient-derived data, like the database itself
        dst = sqlite3.connect(str(tmp))
        try:
            src.backup(dst, pages=PAGES_PER_STEP)
            dst.execute("PRAGMA journal_mode = DELETE")  # one self-contained file
            rows = [r[0] for r in dst.execute("PRAGMA integrity_check")]
            if rows != ["ok"]:
                raise BackupError(f"the copy failed SQLite's integrity_check ({'; '.join(map(str, rows[:5]))}); the "
                                  f"database {db} itself may be damaged - run `sqlite3 {db} 'PRAGMA integrity_check'`")
            app = dst.execute("PRAGMA application_id").fetchone()[0]
            version = int(dst.execute("PRAGMA user_version").fetchone()[0])
            if app not in (0, APPLICATION_ID) or version == 0:
                raise BackupError(f"{db} is not an edge-agent results database; nothing was backed up")
            results = int(dst.execute("SELECT count(*) FROM results").fetchone()[0])
        finally:
            dst.close()
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, target)
        dfd = os.open(target.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except sqlite3.Error as e:
        raise BackupError(f"the backup of {db} to {target} failed ({e}); check the free space and permissions of "
                          f"{target.parent}") from None
    except OSError as e:
        raise BackupError(f"cannot write the backup {target} ({e.strerror or e}); check the free space and "
                          f"permissions of {target.parent}") from None
    finally:
        src.close()
        tmp.unlink(missing_ok=True)
    removed: list[Path] = []
    if keep > 0 and to.is_dir():
        olds = sorted(p for p in to.glob(f"{PREFIX}*.db") if p.is_file() and not p.is_symlink())
        for p in olds[:-keep]:
            p.unlink()
            removed.append(p)
    return BackupResult(target, target.stat().st_size, results, version, removed)


def check_backup(path: Path) -> int:
    """Rows in `results` of a backup file after integrity_check; BackupError if it is not a sound backup."""
    try:
        conn = connect(path, readonly=True)
    except StoreError as e:
        raise BackupError(str(e)) from None
    try:
        rows = [r[0] for r in conn.execute("PRAGMA integrity_check")]
        if rows != ["ok"]:
            raise BackupError(f"{path} fails integrity_check: {'; '.join(map(str, rows[:5]))}")
        return int(conn.execute("SELECT count(*) FROM results").fetchone()[0])
    finally:
        conn.close()
