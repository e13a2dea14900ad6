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
import hashlib
import logging
import os
import queue
import signal
import sqlite3
import stat
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from .cleanup import EmptyFolders
from .config import Settings
from .decode import Decoded
from .fsafe import (Dest, Escaped, Ident, InboxError, Replaced, RootMoved, Source, delete_file, lstat_beneath, move_file,
                    open_beneath)
from .fsafe import ident as ident_of
from .intake import Candidate, Intake
from .share import Share
from .store import Writer, damaged, describe_db_error, is_locked, is_transient, now_iso

log = logging.getLogger(__name__)

COMMIT_ROWS = 64
COMMIT_SECONDS = 0.2
STOP_RETRY_SECONDS = 10.0  # at shutdown, give up on a locked/unwritable database after this long (TimeoutStopSec)
SWEEP_SECONDS = 1.0  # how often to look again at emptied inbox folders that were still inside the quiet period
PROBE_SECONDS = 2.0  # how often to check whether a full or read-only output folder is writable again
# Move failures that are about the output disk, not the file: pause intake instead of failing file by file.
OUTPUT_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}
STOP = object()  # queue sentinel shared by the stages


CRASH_POINTS = ("in_commit", "after_commit", "mid_move", "after_move", "in_file_state",
                "in_decode")  # in_decode: in the decode worker (decode_worker._crash_hook)
_crash_hits: dict[str, int] = {}


def crash_point(name: str) -> None:
    """Test hook: EDGE_AGENT_CRASH_AT=<name>[:<n>] SIGKILLs the agent the n-th time (default: first) it
    reaches point <name> (one of CRASH_POINTS), to prove crash consistency."""
    spec = os.environ.get("EDGE_AGENT_CRASH_AT")
    if not spec:
        return
    point, _, nth = spec.partition(":")
    if point != name:
        return
    _crash_hits[name] = hits = _crash_hits.get(name, 0) + 1
    if hits >= int(nth or 1):
        log.warning("EDGE_AGENT_CRASH_AT=%s: killing the agent now (test hook)", spec)
        os.kill(os.getpid(), signal.SIGKILL)


class StageTimes:
    """Busy seconds per stage, summed over the threads that run it: where a scan's time goes.

    Costs two perf_counter calls and a lock per stage and image; `edge-agent
    bench` reads it to print per-stage times next to the stages measured alone.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.seconds: dict[str, float] = {}
        self.items: dict[str, int] = {}
        self.calls: dict[str, int] = {}

    def add(self, stage: str, seconds: float, items: int = 1) -> None:
        with self._lock:
            self.seconds[stage] = self.seconds.get(stage, 0.0) + seconds
            self.items[stage] = self.items.get(stage, 0) + items
            self.calls[stage] = self.calls.get(stage, 0) + 1

    def snapshot(self) -> dict[str, dict[str, float]]:
        with self._lock:
            return {k: {"seconds": v, "items": self.items.get(k, 0), "calls": self.calls.get(k, 0)}
                    for k, v in self.seconds.items()}


@dataclass
class Job:
    """One inbox file on its way through the stages."""

    cand: Candidate
    sha256: str | None = None
    size: int | None = None
    decoded: Decoded | None = None
    claimed: bool = False
    ident: Ident | None = None  # (st_dev, st_ino) of the inbox entry when it was read: checked before the move


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
    reobserve: bool = False


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
        self.db_problem: str | None = None  # the database cannot be written (locked, disk full, read-only)
        self.out_problem: str | None = None  # files cannot leave the inbox (output disk full or read-only)
        self._unmoved: list[Path] = []  # committed but not moved because of out_problem; moved once it clears
        self._probe_dirs: set[Path] = set()
        self._probe_inbox: set[Path] = set()  # inbox folders that refused to let go of a name (InboxError)
        self._next_probe = 0.0
        self._gave_up = False
        self.fatal: str | None = None
        self.give_up_after: float | None = None  # a one-shot scan stops after this long on an unwritable db
        self.tick = time.monotonic()
        self._reserved: set[Path] = set()
        self.timing = StageTimes()
        self._held = 0  # outcomes handed to this thread and not yet finished
        self._held_lock = threading.Lock()
        # Inbox sub-folders emptied by the moves: removed once empty and quiet (cleanup.py)
        self.folders = EmptyFolders(intake.inbox, settings.quiet_seconds)
        self.share = Share()  # who may read the stored images (share.py); set by the Agent
        self._next_sweep = 0.0

    @property
    def db_error(self) -> str | None:
        """Why this thread cannot finish files right now, if it cannot: the pipeline stops taking new ones."""
        return self.db_problem or self.out_problem

    @property
    def held(self) -> int:
        """Files whose outcome waits here for its commit: rows only, their pixels are already freed."""
        with self._held_lock:
            return self._held

    def _hold(self, n: int) -> None:
        with self._held_lock:
            self._held += n

    def put(self, item: Any) -> None:
        """An Outcome, ("event", kind, detail), ("state", {key: value}), ("call", fn(conn)) or STOP."""
        if isinstance(item, Outcome):
            self._hold(1)
        self.queue.put(item)

    def loop(self) -> None:
        carry: list[Any] = []
        stop = False
        while True:
            self.tick = time.monotonic()
            if self.out_problem and self.tick >= self._next_probe:
                self._probe_outputs()
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
            if self.folders.pending() and (stop or time.monotonic() >= self._next_sweep):
                self._sweep()
            if stop and not carry:
                return

    def _all_here(self, batch: list[Any]) -> bool:
        """Every file in flight already has its outcome in this batch: waiting longer only adds latency."""
        return self.intake.inflight <= sum(1 for o in batch if isinstance(o, Outcome))

    def _drop(self, outs: list[Outcome]) -> list[Any]:
        """The database is gone or damaged: these outcomes are not recorded (or only in a file nobody can
        read), so their files stay in the inbox, untouched, for the next start."""
        self._release_reserved(outs)
        for o in outs:
            o.job.claimed = False
            if o.job.sha256:
                for twin in self.claims.release(o.job.sha256):
                    self.intake.done(twin.cand.rel)
            self.intake.done(o.job.cand.rel)
            self._hold(-1)
        return []

    def _stop_for(self, problem: str) -> None:
        if self.fatal is None:
            self.fatal = problem
            log.error("%s", problem)
        self.on_commit()  # wakes the main loop, which stops on `fatal`

    def _commit(self, batch: list[Any]) -> list[Any]:
        outs = [o for o in batch if isinstance(o, Outcome)]
        ctrl = [o for o in batch if not isinstance(o, Outcome)]
        if self.fatal is not None:
            return self._drop(outs)
        gone = self.store.gone()
        if gone is not None:
            self._stop_for(gone)
            return self._drop(outs)
        attempt = 0
        first_failure = last_log = 0.0
        t0 = time.perf_counter()
        while True:
            try:
                with self.store.transaction(lock_wait=0):
                    for o in outs:
                        self._record(o)
                    for c in ctrl:
                        if c[0] == "event":
                            self.store.event(c[1], c[2])
                        elif c[0] == "state":
                            self.store.set_state(c[1])
                        elif c[0] == "call":  # bookkeeping that must run on the writer's connection (drift.py)
                            c[1](self.store.conn)
                    if any(o.kind == "result" for o in outs):
                        crash_point("in_commit")  # rows written, COMMIT not yet: the transaction must vanish
                break
            except sqlite3.DatabaseError as e:  # disk full, I/O error, locked: worth retrying
                if isinstance(e, (sqlite3.IntegrityError, sqlite3.ProgrammingError, sqlite3.InterfaceError)):
                    raise  # a bug in the agent, not the database's state: the thread guard reports it
                for o in outs:
                    o.table = o.row_id = None
                if not is_transient(e):  # damaged pages, not a database: nothing to wait for
                    self._stop_for(self.store.gone() or damaged(self.store.path, e, self.store.conn))
                    return self._drop(outs)
                attempt += 1
                now = time.monotonic()
                first_failure = first_failure or now
                self.db_problem = describe_db_error(self.store.path, e)
                if self.give_up_after is not None and not is_locked(e) and \
                        now - first_failure >= self.give_up_after:
                    self._stop_for(self.db_problem)  # a one-shot scan: say why and exit instead of waiting
                    return self._drop(outs)
                for o in outs:
                    o.table = o.row_id = None
                self._release_reserved(outs)
                if attempt == 1 or now - last_log >= 30:
                    last_log = now
                    log.error("%s (waiting %.0f s so far; %d image(s) wait for their commit, intake paused; "
                              "retrying)", self.db_problem, now - first_failure, len(outs))
                if self.stopping.is_set() and (self._gave_up or now - first_failure >= STOP_RETRY_SECONDS):
                    # Asked to stop: roll back rather than outlive systemd's stop timeout. Nothing is lost:
                    # files whose outcome was not committed are still in the inbox and screened next time.
                    self._gave_up = True  # the rest of the shutdown does not wait again
                    if outs:
                        log.warning("stopping without recording %d image(s): %s; they stay in the inbox and are "
                                    "screened at the next start", len(outs), self.db_problem)
                    for o in outs:
                        self._hold(-1)
                    return []
                time.sleep(1)
                self.tick = time.monotonic()  # alive and retrying: the systemd watchdog must not fire
        if self.db_problem:
            log.warning("the database can be written again after %.0f s; resuming", time.monotonic() - first_failure)
        self.db_problem = None
        self.timing.add("db", time.perf_counter() - t0, len(outs))
        if any(o.kind == "result" for o in outs):
            crash_point("after_commit")
        gone = self.store.gone()
        if gone is not None:  # committed into a file that was deleted meanwhile: the rows are lost with it
            self._stop_for(gone)
            return self._drop(outs)
        carry: list[Any] = []
        for o in outs:
            if o.job.claimed and o.job.sha256:
                o.job.claimed = False
                for twin in self.claims.release(o.job.sha256):
                    if o.kind in ("result", "duplicate") and o.result_id is not None:
                        carry.append(Outcome("duplicate", twin, result_id=o.result_id))
                        self._hold(1)
                    else:
                        self.intake.done(twin.cand.rel, retry=True)  # its twin was unusable: check it itself
        t0 = time.perf_counter()
        updates = []
        for i, o in enumerate(outs):
            leaves = o.action in ("move", "delete") and o.table is not None
            if leaves:
                self.folders.before(o.job.cand.rel)
            u = self._dispose(o)
            if leaves:
                self.folders.after(o.job.cand.rel)
            if u is not None:
                updates.append(u)
            if i == 0 and len(outs) > 1 and o.action == "move":
                crash_point("mid_move")  # some files of the batch moved, others not
        self._release_reserved(outs)
        self.timing.add("move", time.perf_counter() - t0, len(outs))
        if any(o.kind == "result" for o in outs):
            crash_point("after_move")
        if updates:
            t0 = time.perf_counter()
            try:
                with self.store.transaction(lock_wait=STOP_RETRY_SECONDS):
                    for table, row_id, state, stored in updates:
                        self.store.set_file_state(table, row_id, state, stored)
                    crash_point("in_file_state")
                self.timing.add("db", time.perf_counter() - t0, 0)
            except sqlite3.Error as e:  # the next start reconciles these from the file system
                log.error("could not record that %d file(s) were moved (%s); fixed at next start", len(updates), e)
        for o in outs:
            self._hold(-1)
            self.on_finished(o)
        for o in outs:
            if o.reobserve:  # replaced while being screened: the new content is a new file
                self.intake.observe(o.job.cand.path)
        return carry

    def _sweep(self) -> None:
        """Remove the inbox sub-folders the moves emptied, once quiet (cleanup.py); never fatal."""
        self._next_sweep = time.monotonic() + SWEEP_SECONDS
        try:
            self.folders.sweep()
        except OSError as e:  # the inbox itself became unreadable: the intake reports that
            log.debug("empty-folder cleanup skipped: %s", e)

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
        """base/YYYY-MM-DD/<inbox-relative path>, made unique with the hash prefix and a counter (the name
        recorded in the row; move_file still never replaces a file and falls back to a short hash-based
        name when this one cannot be created)."""
        day = datetime.now(timezone.utc).strftime("%Y-%m-%d")
        d = Dest(base, day, job.cand.rel, _tag(job))
        dest = d.path
        for cand in d.candidates():
            dest = base / cand
            if dest not in self._reserved and not os.path.lexists(dest):
                break
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

    def _base(self, table: str) -> Path:
        return self.quarantine if table == "quarantine" else \
            self.processed / "duplicates" if table == "duplicates" else self.processed

    def _dispose(self, o: Outcome) -> tuple[str, int, str, str | None] | None:
        """Move/delete the inbox file of a committed outcome; returns its file_state update (and the stored
        path when the file went elsewhere than the row says)."""
        if o.action in ("none", "keep") or o.table is None or o.row_id is None:
            o.settle = o.action == "keep"
            return None
        src_path = o.job.cand.path
        src = Source(self.intake.inbox, o.job.cand.rel, o.job.ident, o.job.sha256)
        if self._replaced(o):
            return self._was_replaced(o)
        try:
            if o.action == "delete":
                try:
                    delete_file(src)
                except FileNotFoundError:
                    pass
                except Escaped as e:
                    log.warning("%s: %s; the file is no longer in the inbox and nothing outside it is deleted",
                                src_path, _escaped_why(e))
                    return o.table, o.row_id, "missing", None
                except Replaced:
                    return self._was_replaced(o)
                return o.table, o.row_id, "deleted", None
            assert o.dest is not None
            base = self._base(o.table)
            try:
                prefer = o.dest.relative_to(base).as_posix()
            except ValueError:
                prefer = ""
            day = prefer.split("/", 1)[0] if prefer else datetime.now(timezone.utc).strftime("%Y-%m-%d")
            try:
                went = move_file(src, Dest(base, day, o.job.cand.rel, _tag(o.job), prefer),
                                 private=o.table == "quarantine", share=self.share)
            except (FileNotFoundError, Escaped) as e:
                if isinstance(e, Escaped):
                    log.warning("%s: %s; the file is no longer in the inbox and nothing outside it is touched",
                                src_path, _escaped_why(e))
                return o.table, o.row_id, ("moved" if os.path.lexists(o.dest) else "missing"), None
            except Replaced:
                return self._was_replaced(o)
            if went != o.dest:
                log.info("%s could not be stored as %s (taken or not a valid name); stored as %s", src_path, o.dest,
                         went)
            return o.table, o.row_id, "moved", (None if went == o.dest else str(went))
        except OSError as e:
            where = o.dest.parent if o.dest is not None else src_path.parent
            if isinstance(e, InboxError):  # the copy is stored; the inbox refused to let go of the name
                where = src_path.parent
                problem = (f"cannot remove files from the inbox {where}: {e.strerror or e} (a read-only mount, or "
                           "no write permission for the agent); intake paused until the inbox is writable again: "
                           "remount it read-write or give the agent's user write access to it")
                self._pause(problem, self._probe_inbox, where, src_path, announce=self.out_problem != problem)
                return None
            if e.errno in OUTPUT_ERRNOS:
                # The output disk is full or read-only (or not writable for us): every other file would fail
                # the same way. Stop taking files, keep this one in the inbox (its row says 'pending'), and
                # move it once a probe shows the folder is writable again.
                problem = (f"cannot {o.action} files out of the inbox into {where}: {e.strerror or e}; intake "
                           "paused until it is writable again (free space, remount read-write or fix permissions)")
                self._pause(problem, self._probe_dirs, where, src_path, announce=self.out_problem is None)
                return None
            o.settle = True
            log.error("recorded %s but could not %s it (%s); it stays in the inbox - fix permissions/space on %s",
                      src_path, o.action, e, where)
            self.queue.put(("event", "move_failed", f"{src_path}: {e}"))
            return None

    def _pause(self, problem: str, probes: set[Path], where: Path, src_path: Path, *, announce: bool) -> None:
        """Stop taking files because a folder refuses writes: every other file would fail the same way. The file
        stays in the inbox (its row says 'pending') and moves once a probe of `where` shows it writable again.
        `announce` is False while an output problem is already reported, so two refusing folders (processed/
        and quarantine/) do not alternate their messages in the log."""
        if announce:
            log.error("%s", problem)
            self.queue.put(("event", "paused", problem))
            self.queue.put(("state", {"paused": problem}))
        self.out_problem = problem
        probes.add(where)
        self._next_probe = time.monotonic() + PROBE_SECONDS
        self._unmoved.append(src_path)

    def _was_replaced(self, o: Outcome) -> tuple[str, int, str, str | None]:
        assert o.table is not None and o.row_id is not None
        src = o.job.cand.path
        o.reobserve = True
        log.warning("%s was replaced by another file while it was being screened: %s #%s records the earlier "
                    "content, which is gone; the new content is screened as a new file", src, o.table, o.row_id)
        self.queue.put(("event", "replaced", f"{src}: {o.table} #{o.row_id} records the earlier content"))
        return o.table, o.row_id, "replaced", None

    def _replaced(self, o: Outcome) -> bool:
        """Is the inbox file no longer the one that was screened (another inode, or overwritten in place)?"""
        if o.action not in ("move", "delete"):
            return False
        root, rel = self.intake.inbox, o.job.cand.rel
        try:
            now = lstat_beneath(root, rel)
        except OSError:
            return False  # gone (or a folder on the way swapped for a link): handled by the move
        if o.job.ident is not None and ident_of(now) != o.job.ident:
            return True
        key = o.job.cand.key
        if key is None or (now.st_size, now.st_mtime_ns, now.st_ctime_ns, now.st_ino) == key:
            return False
        if o.job.sha256 is None or not stat.S_ISREG(now.st_mode):
            return True
        h = hashlib.sha256()
        try:  # never through a link (it could point out of the inbox), never blocking on a pipe
            fd, _ = open_beneath(root, rel)
            with os.fdopen(fd, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
        except OSError:
            return True
        return h.hexdigest() != o.job.sha256  # same content (touched, or rewritten identically): move it

    def _probe_outputs(self) -> None:
        """While moves fail for lack of space or write access: try a small write; resume when it works."""
        self._next_probe = time.monotonic() + PROBE_SECONDS
        for d in list(self._probe_inbox):  # nothing is written into the inbox: ask the kernel instead
            try:
                writable = os.access(d, os.W_OK) and not os.statvfs(d).f_flag & os.ST_RDONLY
            except OSError:
                writable = False
            if not writable:
                log.debug("inbox folder %s still not writable", d)
                return
        for d in list(self._probe_dirs):
            while not d.is_dir() and d.parent != d:
                d = d.parent  # probe where the move would create its folder, without creating it (modes)
            try:
                fd, tmp = tempfile.mkstemp(prefix=".edge-agent-probe-", dir=d)
                try:
                    os.write(fd, b"\0" * 65536)
                    os.fsync(fd)
                finally:
                    os.close(fd)
                    os.unlink(tmp)
            except OSError as e:
                log.debug("output folder %s still not writable: %s", d, e)
                return
        log.warning("the inbox and the output folders are writable again; resuming intake and moving the %d "
                    "file(s) that were screened meanwhile", len(self._unmoved))
        self.queue.put(("event", "resumed", self.out_problem or ""))
        self.out_problem = None
        self._probe_dirs.clear()
        self._probe_inbox.clear()
        unmoved, self._unmoved = self._unmoved, []
        for p in unmoved:
            self.intake.observe(p, confirmed=True)  # recognized by path and hash: only the move is owed


def _s(p: Path | None) -> str | None:
    return None if p is None else str(p)


def _state(action: str) -> str:
    return "kept" if action == "keep" else "pending"


def _tag(job: Job) -> str:
    """A content tag for unique and fallback names: the sha256, or for unreadable files a hash of the name."""
    if job.sha256:
        return job.sha256
    return hashlib.sha256(job.cand.rel.encode("utf-8", "surrogateescape")).hexdigest()


def _escaped_why(e: OSError) -> str:
    if isinstance(e, RootMoved):
        return e.strerror or "the inbox folder itself was replaced"
    return "a folder on its way was replaced by a symbolic link"
