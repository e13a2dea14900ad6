"""Retention: remove stored images the clinic no longer needs on the box, and only those.

Why this shape: an SD card fills in months. Pruning starts from the database, never from the folders: a
file is removed only when a row says the agent stored it there (file_state 'moved'), the path lies inside
the processed or quarantine folder, it is reached without following a symlink (fsafe.py), it is a regular
file, and its content still has the row's sha256. Anything else is left alone and named in the report.
The row stays (results are the record); its file_state becomes 'pruned' with `pruned_at`. The inbox, and
rows of files kept there (after = keep), are never touched.

Two triggers: age (keep_processed_days, keep_quarantine_days; 0 keeps for ever) and a disk watermark
(prune_free_mb): while the processed folder's disk has less free space than that, the oldest stored
screened images go first (quarantined files are kept: a person has to look at them). Should the disk still
fill, intake pauses as before (min_free_mb).
"""
from __future__ import annotations

import hashlib
import logging
import os
import shutil
import sqlite3
import stat
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path

from .fsafe import Escaped, parent_fd
from .paths import inside, real
from .store import BUSY_TIMEOUT_MS, connect, fs_path, now_iso, to_iso

log = logging.getLogger(__name__)

BATCH = 200  # rows per write transaction: short, so the agent's writer never waits long
# (table, time column, which folder its stored copies live in)
SOURCES = (("results", "processed_at", "processed"), ("duplicates", "recorded_at", "processed"),
           ("quarantine", "quarantined_at", "quarantine"))


@dataclass
class Policy:
    keep_processed_days: float = 0.0
    keep_quarantine_days: float = 0.0
    prune_free_mb: float = 0.0

    @property
    def active(self) -> bool:
        return bool(self.keep_processed_days or self.keep_quarantine_days or self.prune_free_mb)


@dataclass
class Report:
    removed: int = 0
    removed_bytes: int = 0
    missing: int = 0  # the row said stored, the file was already gone: marked 'missing'
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, why it was left alone)
    would_remove: list[str] = field(default_factory=list)  # --dry-run
    by_table: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, object]:
        return {"removed": self.removed, "removed_bytes": self.removed_bytes, "missing": self.missing,
                "skipped": [{"path": p, "why": w} for p, w in self.skipped], "would_remove": self.would_remove,
                "by_table": self.by_table}


def _free_mb(path: Path) -> float:
    try:
        return shutil.disk_usage(path).free / 2**20
    except OSError:
        return float("inf")


# Constant SQL per table (no identifier is built from data): rows whose stored copy may go, oldest first.
_CANDIDATES = {
    "results": "SELECT id, sha256, stored_path, processed_at AS at FROM results WHERE file_state = 'moved' "
               "AND stored_path IS NOT NULL AND processed_at < ? ORDER BY processed_at, id",
    "duplicates": "SELECT id, sha256, stored_path, recorded_at AS at FROM duplicates WHERE file_state = 'moved' "
                  "AND stored_path IS NOT NULL AND recorded_at < ? ORDER BY recorded_at, id",
    "quarantine": "SELECT id, sha256, stored_path, quarantined_at AS at FROM quarantine WHERE file_state = 'moved' "
                  "AND stored_path IS NOT NULL AND quarantined_at < ? ORDER BY quarantined_at, id",
}
EVERYTHING = "9999"  # sorts after every ISO-8601 time: the watermark considers every stored row


def _candidates(conn: sqlite3.Connection, table: str, col: str, before: str | None) -> Iterator[sqlite3.Row]:
    """Rows whose stored copy may go, oldest first (before=None: every stored row, for the watermark)."""
    yield from conn.execute(_CANDIDATES[table], (before or EVERYTHING,))


def _same_content(fd: int, name: str, sha256: str) -> bool:
    f = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=fd)
    try:
        h = hashlib.sha256()
        while chunk := os.read(f, 1 << 20):
            h.update(chunk)
    finally:
        os.close(f)
    return h.hexdigest() == sha256


def _remove(root: Path, stored: str, sha256: str | None, dry_run: bool) -> tuple[str, int]:
    """('removed'|'would'|'missing'|why-not, size). Only a regular file reached without symlinks, inside
    root, whose content still matches the row."""
    p = Path(stored)
    if not p.is_absolute() or ".." in p.parts or not inside(p, root) or p == root:
        return f"not inside {root}: the row does not describe a file this command may remove", 0
    rel = p.relative_to(root).as_posix()
    try:
        with parent_fd(root, rel) as (fd, name):
            try:
                st = os.stat(name, dir_fd=fd, follow_symlinks=False)
            except FileNotFoundError:
                return "missing", 0
            if not stat.S_ISREG(st.st_mode):
                return "not a regular file (a symlink or folder took its place): left alone", 0
            if sha256 and not _same_content(fd, name, sha256):
                return "its content is not the image the row describes (sha256 differs): left alone", 0
            if dry_run:
                return "would", st.st_size
            os.unlink(name, dir_fd=fd)
            return "removed", st.st_size
    except Escaped:
        return "a folder on its path is a symlink: left alone", 0
    except FileNotFoundError:
        return "missing", 0
    except OSError as e:
        return f"cannot remove it ({e.strerror or e})", 0


def _rmdir_empty(root: Path) -> None:
    """Remove day folders emptied by pruning (never root itself, never through a symlink)."""
    for dirpath, dirnames, filenames in os.walk(root, topdown=False, followlinks=False):
        if Path(dirpath) == root or filenames:
            continue
        try:
            os.rmdir(dirpath)
        except OSError:
            pass


def prune(db: Path, processed: Path, quarantine: Path, policy: Policy, dry_run: bool = False,
          now: datetime | None = None) -> Report:
    """Apply the retention policy once; returns what was (or would be, dry_run) removed and what was not."""
    rep = Report()
    if not policy.active:
        return rep
    now = now or datetime.now(timezone.utc)
    roots = {"processed": real(processed), "quarantine": real(quarantine)}
    conn = connect(db, readonly=dry_run)
    try:
        conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        pending: list[tuple[str, int, str]] = []  # (table, id, new state)

        def flush() -> None:
            if dry_run or not pending:
                pending.clear()
                return
            at = now_iso()
            conn.execute("BEGIN IMMEDIATE")
            try:
                for table, rid, state in pending:
                    conn.execute(f"UPDATE {table} SET file_state = ?, pruned_at = ? WHERE id = ? "
                                 "AND file_state = 'moved'", (state, at if state == "pruned" else None, rid))
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            pending.clear()

        done: set[tuple[str, int]] = set()

        def one(table: str, row: sqlite3.Row, root: Path) -> int:
            key = (table, int(row["id"]))
            if key in done:
                return 0
            done.add(key)
            stored = fs_path(row["stored_path"]) or ""
            what, size = _remove(root, stored, row["sha256"], dry_run)
            if what in ("removed", "would"):
                rep.removed += what == "removed"
                rep.removed_bytes += size
                rep.by_table[table] = rep.by_table.get(table, 0) + 1
                if what == "would":
                    rep.would_remove.append(stored)
                else:
                    pending.append((table, key[1], "pruned"))
            elif what == "missing":
                rep.missing += 1
                pending.append((table, key[1], "missing"))
            else:
                rep.skipped.append((stored, what))
            if len(pending) >= BATCH:
                flush()
            return size if what in ("removed", "would") else 0

        for table, col, where in SOURCES:
            days = policy.keep_quarantine_days if where == "quarantine" else policy.keep_processed_days
            if days <= 0:
                continue
            cutoff = to_iso(now - timedelta(days=days))
            for row in list(_candidates(conn, table, col, cutoff)):
                one(table, row, roots[where])
        flush()
        if policy.prune_free_mb > 0:
            short = policy.prune_free_mb - _free_mb(roots["processed"])
            if short > 0:
                log.warning("the disk of %s has less than prune_free_mb %.0f MiB free: removing the oldest stored "
                            "images until it has", roots["processed"], policy.prune_free_mb)
                rows = sorted(((row["at"], table, row) for table, col, where in SOURCES if where == "processed"
                               for row in _candidates(conn, table, col, None)), key=lambda x: (x[0] or "", x[1]))
                freed = 0.0
                for _, table, row in rows:
                    if freed >= short * 2**20:
                        break
                    freed += one(table, row, roots["processed"])
                flush()
        if not dry_run:
            for root in roots.values():
                if root.is_dir():
                    _rmdir_empty(root)
    finally:
        conn.close()
    if rep.removed or rep.missing or rep.skipped:
        log.info("pruned %d stored file(s) (%.1f MiB); %d already gone; %d left alone", rep.removed,
                 rep.removed_bytes / 2**20, rep.missing, len(rep.skipped))
    for path, why in rep.skipped[:20]:
        log.warning("prune: %s: %s", path, why)
    return rep
