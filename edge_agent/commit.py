"""Stages 5 and 6: record outcomes in SQLite in batches, then move the files out of the inbox.

One thread owns the database. It commits every COMMIT_ROWS rows or
COMMIT_SECONDS, whichever comes first (a commit with synchronous=FULL costs
an fsync, so batching is what makes it cheap), and only after the commit
moves, deletes or keeps the files. Each row is inserted with
file_state='pending' and the destination it is about to be moved to, so a
crash between commit and move is finished on restart (same path and hash)
instead of recorded twice, and a crash after the move is reconciled from the
file system.
"""
from __future__ import annotations

import errno
import logging
import os
import queue
import shutil
import signal
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from .config import Settings
from .decode import Decoded
from .intake import Candidate, Intake
from .store import Writer, now_iso

log = logging.getLogger(__name__)

COMMIT_ROWS = 64
COMMIT_SECONDS = 0.2
STOP = object()  # queue sentinel shared by the stages


def crash_point(name: str) -> None:
    """Test hook: EDGE_AGENT_CRASH_AT=<name> SIGKILLs the agent here, to prove crash consistency."""
    if os.environ.get("EDGE_AGENT_CRASH_AT") == name:
        log.warning("EDGE_AGENT_CRASH_AT=%s: killing the agent now (test hook)", name)
        os.kill(os.getpid(), signal.SIGKILL)


@dataclass
class Job:
    """One inbox file on its way through the stages."""

    cand: Candidate
    sha256: str | None = None
    size: int | None = None
    decoded: Decoded | None = None
    claimed: bool = False


@dataclass
class Outcome:
    """What became of a job; the committer records it and then moves the file.

    kind: result | duplicate | quarantine (a row each); finish (a row exists
    from before a crash: just move the file); skip (recorded and kept);
    defer / recheck (looked incomplete: wait); vanished (left the inbox).
    """

    kind: str
    job: Job
    row: dict[str, Any] = field(default_factory=dict)
    result_id: int | None = None
    existing: dict[str, Any] | None = None
    code: str = ""
    reason: str = ""
    table: str | None = None
    row_id: int | None = None
    action: str = "none"  # move | delete | keep | none
    dest: Path | None = None
    settle: bool = False


class Claims:
    """Which sha256 values are in flight, so two copies of one image are screened once.

    The first copy claims the hash; later copies wait ("park") until the
    first one's outcome is committed, then become duplicates pointing at it.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._owners: dict[str, list[Job]] = {}

    def claim(self, sha256: str, job: Job) -> bool:
        with self._lock:
            if sha256 in self._owners:
                self._owners[sha256].append(job)
                return False
            self._owners[sha256] = []
            return True

    def release(self, sha256: str) -> list[Job]:
        with self._lock:
            return self._owners.pop(sha256, [])


class Committer:
    """The writer thread: batches outcomes into transactions, then disposes of the files."""

    def __init__(self, settings: Settings, store: Writer, intake: Intake, claims: Claims, processed: Path,
                 quarantine: Path, on_finished: Callable[[Outcome], None], on_commit: Callable[[], None],
                 stopping: threading.Event) -> None:
        self.s, self.store, self.intake, self.claims = settings, store, intake, claims
        self.processed, self.quarantine = processed, quarantine
        self.on_finished, self.on_commit, self.stopping = on_finished, on_commit, stopping
        self.queue: queue.Queue[Any] = queue.Queue()
        self.db_error: str | None = None
        self.fatal: str | None = None
        self.tick = time.monotonic()
        self._reserved: set[Path] = set()

    def put(self, item: Any) -> None:
        """An Outcome, ("event", kind, detail), ("state", {key: value}) or STOP."""
        self.queue.put(item)

    def loop(self) -> None:
        carry: list[Any] = []
        stop = False
        while True:
            self.tick = time.monotonic()
            batch, carry = carry, []
            deadline = time.monotonic() + COMMIT_SECONDS if batch else None
            while len(batch) < COMMIT_ROWS and not stop:
                timeout = COMMIT_SECONDS if deadline is None else deadline - time.monotonic()
                if timeout <= 0 or (batch and self._all_here(batch)):
                    break
                try:
                    item = self.queue.get(timeout=timeout)
                except queue.Empty:
                    break
                if item is STOP:
                    stop = True
                    break
                batch.append(item)
                if deadline is None:
                    deadline = time.monotonic() + COMMIT_SECONDS
            if batch:
                carry = self._commit(batch)
                self.on_commit()
            if stop and not carry:
                return

    def _all_here(self, batch: list[Any]) -> bool:
        """Every file in flight already has its outcome in this batch: waiting longer only adds latency."""
        return self.intake.inflight <= sum(1 for o in batch if isinstance(o, Outcome))

    def _commit(self, batch: list[Any]) -> list[Any]:
        outs = [o for o in batch if isinstance(o, Outcome)]
        ctrl = [o for o in batch if not isinstance(o, Outcome)]
        attempt = 0
        while True:
            try:
                with self.store.transaction():
                    for o in outs:
                        self._record(o)
                    for c in ctrl:
                        if c[0] == "event":
                            self.store.event(c[1], c[2])
                        elif c[0] == "state":
                            self.store.set_state(c[1])
                break
            except sqlite3.OperationalError as e:  # disk full, I/O error, locked: worth retrying
                attempt += 1
                self.db_error = f"cannot write to the database {self.s.db_path} ({e})"
                for o in outs:
                    o.table = o.row_id = None
                self._release_reserved(outs)
                log.error("%s; intake paused, retrying in 2 s - free disk space or fix permissions", self.db_error)
                if self.stopping.is_set() and attempt >= 3:
                    self.fatal = f"{self.db_error}; the unrecorded images stay in the inbox"
                    return []
                time.sleep(2)
                self.tick = time.monotonic()  # alive and retrying: the systemd watchdog must not fire
        self.db_error = None
        if any(o.kind == "result" for o in outs):
            crash_point("after_commit")
        carry: list[Any] = []
        for o in outs:
            if o.job.claimed and o.job.sha256:
                o.job.claimed = False
                for twin in self.claims.release(o.job.sha256):
                    if o.kind in ("result", "duplicate") and o.result_id is not None:
                        carry.append(Outcome("duplicate", twin, result_id=o.result_id))
                    else:
                        self.intake.done(twin.cand.rel, retry=True)  # its twin was unusable: check it itself
        updates = [u for u in (self._dispose(o) for o in outs) if u is not None]
        self._release_reserved(outs)
        if any(o.kind == "result" for o in outs):
            crash_point("after_move")
        if updates:
            try:
                with self.store.transaction():
                    for table, row_id, state in updates:
                        self.store.set_file_state(table, row_id, state)
            except sqlite3.Error as e:  # the next start reconciles these from the file system
                log.error("could not record that %d file(s) were moved (%s); fixed at next start", len(updates), e)
        for o in outs:
            self.on_finished(o)
        return carry

    # --- where files go ------------------------------------------------------------------

    def _plan(self, kind: str, job: Job) -> tuple[str, Path | None]:
        """What happens to the inbox file after the commit, and where it goes."""
        after = self.s.after
        if kind == "quarantine":
            # Never delete unusable input: a person has to look at it.
            return ("keep", None) if after == "keep" else ("move", self._destination(self.quarantine, job))
        if after == "move":
            base = self.processed / "duplicates" if kind == "duplicate" else self.processed
            return "move", self._destination(base, job)
        return ("delete", None) if after == "delete" else ("keep", None)

    def _destination(self, base: Path, job: Job) -> Path:
        """base/YYYY-MM-DD/<inbox-relative path>, made unique with the hash prefix and a counter."""
        day = datetime.now(timezone.utc).strftime("%Y-%m-%d")
        rel = Path(job.cand.rel)
        dest = base / day / rel
        stem, suffix = rel.stem, rel.suffix
        tag = (job.sha256 or "nohash")[:8]
        n = 1
        while dest in self._reserved or os.path.lexists(dest):
            dest = base / day / rel.parent / (f"{stem}-{tag}{suffix}" if n == 1 else f"{stem}-{tag}-{n}{suffix}")
            n += 1
        self._reserved.add(dest)
        return dest

    def _release_reserved(self, outs: list[Outcome]) -> None:
        for o in outs:
            if o.dest is not None:
                self._reserved.discard(o.dest)

    def _record(self, o: Outcome) -> None:
        j, c = o.job, o.job.cand
        common = {"original_name": Path(c.rel).name, "original_path": str(c.path), "received_at": c.received_at}
        if o.kind == "result":
            o.action, o.dest = self._plan("result", j)
            rid = self.store.insert_result({**o.row, **common, "stored_path": _s(o.dest),
                                            "file_state": _state(o.action)})
            if rid is not None:
                o.table, o.row_id, o.result_id = "results", rid, rid
                return
            if o.dest is not None:  # another process screened the same image first
                self._reserved.discard(o.dest)
            o.kind, o.result_id = "duplicate", self.store.result_id(j.sha256 or "")
        if o.kind == "duplicate":
            o.action, o.dest = self._plan("duplicate", j)
            o.table = "duplicates"
            o.row_id = self.store.insert_duplicate({"sha256": j.sha256, "result_id": o.result_id, **common,
                                                    "stored_path": _s(o.dest), "file_state": _state(o.action),
                                                    "recorded_at": now_iso()})
        elif o.kind == "quarantine":
            o.action, o.dest = self._plan("quarantine", j)
            o.table = "quarantine"
            o.row_id = self.store.insert_quarantine({"sha256": j.sha256, **common, "stored_path": _s(o.dest),
                                                     "file_state": _state(o.action), "reason_code": o.code,
                                                     "reason": o.reason, "size_bytes": j.size,
                                                     "quarantined_at": now_iso()})
        elif o.kind == "skip":  # recorded earlier and kept in the inbox on purpose: nothing to write
            assert o.existing is not None
            o.table, o.row_id, o.action = o.existing["table"], o.existing["id"], "keep"
        elif o.kind == "finish":
            assert o.existing is not None
            o.table, o.row_id = o.existing["table"], o.existing["id"]
            kind = {"results": "result", "duplicates": "duplicate", "quarantine": "quarantine"}[o.table]
            o.action, o.dest = self._plan(kind, j)
            stored = o.existing["stored_path"]
            if o.action == "move" and stored:
                if o.dest is not None:
                    self._reserved.discard(o.dest)
                o.dest = Path(stored)  # the place recorded before the crash
            self.store.set_file_state(o.table, o.row_id, _state(o.action), _s(o.dest))

    def _dispose(self, o: Outcome) -> tuple[str, int, str] | None:
        """Move/delete the inbox file of a committed outcome; returns its file_state update."""
        if o.action in ("none", "keep") or o.table is None or o.row_id is None:
            o.settle = o.action == "keep"
            return None
        src = o.job.cand.path
        try:
            if o.action == "delete":
                try:
                    os.unlink(src)
                except FileNotFoundError:
                    pass
                return o.table, o.row_id, "deleted"
            assert o.dest is not None
            if not os.path.lexists(src):
                return o.table, o.row_id, ("moved" if os.path.lexists(o.dest) else "missing")
            move_file(src, o.dest, private=o.table == "quarantine")
            return o.table, o.row_id, "moved"
        except OSError as e:
            o.settle = True
            log.error("recorded %s but could not %s it (%s); it stays in the inbox - fix permissions/space on %s",
                      src, o.action, e, o.dest or src.parent)
            self.queue.put(("event", "move_failed", f"{src}: {e}"))
            return None


def _s(p: Path | None) -> str | None:
    return None if p is None else str(p)


def _state(action: str) -> str:
    return "kept" if action == "keep" else "pending"


def move_file(src: Path, dest: Path, private: bool = False) -> None:
    """Rename into place; across file systems copy to a temp name, fsync, rename, then unlink."""
    dest.parent.mkdir(parents=True, exist_ok=True, mode=0o700 if private else 0o777)
    try:
        os.rename(src, dest)
        return
    except OSError as e:
        if e.errno != errno.EXDEV:
            raise
    tmp = dest.with_name(f".{dest.name}.edge-agent-tmp")
    shutil.copy2(src, tmp, follow_symlinks=False)
    if not os.path.islink(tmp):
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
    os.replace(tmp, dest)
    os.unlink(src)
