"""Decide when an inbox file is complete, and hand each one to the pipeline once.

Files arrive in many ways: a local `cp` (inotify close-write says when it is
done), an atomic rename from a temp name (complete the moment it appears),
an SMB/NFS copy from another machine (no events at all; only a quiet period
without size/mtime/ctime changes tells us it is done). Temp and hidden names
(`.part`, `.tmp`, `~`, dotfiles) are left alone until renamed; a temp file
that stops changing for `partial_timeout` is an abandoned upload and goes to
quarantine so someone notices. ctime is part of the "changed" check because
copy tools can preserve an old mtime while still writing.

Only paths are held here (never contents), and at most `limit` of them;
beyond that, events are dropped and the next rescan picks the files up, so a
flood of arrivals cannot exhaust memory.
"""
from __future__ import annotations

import errno
import hashlib
import logging
import os
import stat as st
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

from . import fsafe
from .fsafe import Ident
from .store import now_iso

log = logging.getLogger(__name__)

TEMP_SUFFIXES = (".part", ".partial", ".tmp", "~", ".crdownload", ".download", ".filepart", ".swp", ".!qb")
StatKey = tuple[int, int, int, int]


def name_kind(name: str) -> str:
    """'hidden' (never touched), 'temp' (wait for a rename) or 'image' (a candidate)."""
    if name.startswith("."):
        return "hidden"
    if name.lower().endswith(TEMP_SUFFIXES):
        return "temp"
    return "image"


@dataclass
class Candidate:
    """One inbox file handed to the pipeline."""

    rel: str
    path: Path
    received_at: str
    dispatched: float = 0.0
    final: bool = False       # no more waiting: an incomplete file is quarantined, not deferred
    abandoned: bool = False   # a temp-named file that was never renamed
    provisional: bool = False  # taken before its quiet period: if it fails the checks, wait and look again
    key: StatKey | None = None  # (size, mtime, ctime, inode) when taken: a change before the move means a new file


@dataclass
class _Track:
    key: StatKey
    last_change: float
    confirmed: bool
    received_at: str
    kind: str
    deferred: bool = False
    provisional: bool = False
    ready: bool = False
    last_stat: float = 0.0
    note: str = ""  # why it was deferred (the check it failed, e.g. "truncated")


def _key(s: os.stat_result) -> StatKey:
    return (s.st_size, s.st_mtime_ns, s.st_ctime_ns, s.st_ino)


class Intake:
    """Thread-safe registry of inbox files: tracked, ready, in flight, settled."""

    def __init__(self, inbox: Path, exclude: list[Path] | tuple[Path, ...] = (), quiet: float = 2.0,
                 partial_timeout: float = 600.0, limit: int = 10_000) -> None:
        self.inbox = Path(os.path.abspath(inbox))
        self.exclude = [Path(os.path.abspath(p)) for p in exclude]
        self.quiet, self.partial_timeout, self.limit = quiet, partial_timeout, limit
        self._lock = threading.RLock()
        self._tracks: dict[str, _Track] = {}
        self._ready: deque[str] = deque()
        self._inflight: dict[str, Candidate] = {}
        self._settled: dict[str, StatKey] = {}
        self.overflowed = False
        # Folders the walk could not enter (no permission, nested past PATH_MAX): rel -> why. Their files
        # cannot get an outcome; a scan says so (exit 1) and `status` lists them, instead of a warning at
        # every rescan and a scan that reported "all done".
        self.unlisted: dict[str, str] = {}
        self.hidden: list[str] = []  # names starting with a dot, never touched: a scan names them (first few)

    # --- observing ---------------------------------------------------------

    def rel_of(self, path: str | Path) -> str | None:
        """Inbox-relative path, or None for paths we must not take (outside, excluded, hidden)."""
        p = Path(os.path.abspath(path))
        if p == self.inbox or not p.is_relative_to(self.inbox):
            return None
        if any(p == e or p.is_relative_to(e) for e in self.exclude):
            return None
        rel = p.relative_to(self.inbox)
        if any(part.startswith(".") for part in rel.parts):
            return None
        return rel.as_posix()

    def observe(self, path: str | Path, confirmed: bool = False, initial: bool = False) -> None:
        """Note that a file exists or changed; `confirmed`: a close-write or rename said it is complete."""
        rel = self.rel_of(path)
        if rel is None:
            return
        try:
            s = os.lstat(self.inbox / rel)
        except OSError:
            self.forget(path)
            return
        if st.S_ISDIR(s.st_mode):
            return
        now = time.monotonic()
        key = _key(s)
        with self._lock:
            if rel in self._inflight or self._settled.get(rel) == key:
                return
            self._settled.pop(rel, None)
            tr = self._tracks.get(rel)
            if tr is None:
                if len(self._tracks) >= self.limit:
                    self.overflowed = True
                    return
                last = now
                if initial:  # trust the file's own timestamps: the agent was not running when it changed
                    age = time.time() - max(s.st_mtime, s.st_ctime)
                    last = now - max(0.0, age)
                self._tracks[rel] = tr = _Track(key, last, confirmed, now_iso(), name_kind(Path(rel).name),
                                                last_stat=now)
            elif tr.key != key:
                tr.key, tr.last_change, tr.confirmed, tr.deferred = key, now, confirmed, False
            else:
                tr.confirmed = tr.confirmed or confirmed
            if initial and tr.kind == "image" and not tr.confirmed and now - tr.last_change < self.quiet:
                # Found at start-up and changed recently: it may still be being written, or it may be
                # complete and waiting for us. Take it now (cold start matters) but provisionally; the
                # container checks in decode tell a complete image from a partial one, and a file that
                # fails them gets the normal quiet period before it is judged.
                tr.provisional = tr.confirmed = True
            self._check(rel, tr, now)

    def forget(self, path: str | Path) -> None:
        """The file left the inbox (deleted or renamed away)."""
        rel = self.rel_of(path)
        if rel is None:
            return
        with self._lock:
            self._tracks.pop(rel, None)
            self._settled.pop(rel, None)

    def scan(self, initial: bool = False, under: Path | None = None, confirmed: bool = False) -> int:
        """Walk the inbox (or a sub-folder) without following symlinks; returns how many image files it saw
        (temp names excluded; more than are tracked when the limit was reached).

        initial: trust file timestamps for completeness (the agent was not
        running while they changed). confirmed: the folder was renamed into
        the inbox, so its files are complete.
        """
        root = Path(os.path.abspath(under)) if under else self.inbox
        if fsafe.root_change(self.inbox) is not None:
            return 0  # the inbox was swapped under the agent: list nothing from wherever its path leads now
        seen: set[str] = set()
        images = 0
        errors: dict[str, str] = {}
        hidden: list[str] = []
        for dirpath, dirnames, filenames in os.walk(root, followlinks=False,
                                                    onerror=lambda e: self._walk_error(e, errors)):
            here = Path(dirpath)
            keep = []
            for d in dirnames:
                full = here / d
                if d.startswith(".") or any(full == e for e in self.exclude):
                    continue
                if os.path.islink(full):
                    filenames.append(d)  # a linked folder is an entry we must give an outcome to
                else:
                    keep.append(d)
            dirnames[:] = keep
            for name in filenames:
                if name.startswith(".") and len(hidden) < 1000 and (here / name).is_relative_to(self.inbox):
                    hidden.append((here / name).relative_to(self.inbox).as_posix())
                rel = self.rel_of(here / name)
                if rel is None:
                    continue
                seen.add(rel)
                self.observe(here / name, confirmed=confirmed, initial=initial)
                images += name_kind(name) == "image"
        for rel, why in errors.items():
            if rel not in self.unlisted:
                log.warning("cannot list %s in the inbox: %s", _short(rel), why)
        self.unlisted = errors if under is None else {**self.unlisted, **errors}
        if under is None:
            self.hidden = hidden
            with self._lock:
                for rel in [r for r in self._settled if r not in seen]:
                    del self._settled[rel]
                for rel in [r for r, t in self._tracks.items() if r not in seen and r not in self._inflight]:
                    del self._tracks[rel]
                if len(self._tracks) < self.limit:
                    self.overflowed = False
        return images

    def _walk_error(self, e: OSError, errors: dict[str, str]) -> None:
        path = Path(os.fspath(e.filename)) if e.filename else self.inbox
        rel = path.relative_to(self.inbox).as_posix() if path.is_relative_to(self.inbox) else str(path)
        if e.errno == errno.ENAMETOOLONG:
            why = ("cannot list the folder: it is nested deeper than the system's path limit (4096 bytes); move "
                   "its images to a shallower folder of the inbox")
        elif e.errno in (errno.EACCES, errno.EPERM):
            why = ("cannot list the folder: permission denied; give the agent's user read and execute access to "
                   "it (chmod/chgrp), or move its images out")
        else:
            why = f"cannot list the folder ({e.strerror}); check the disk and the agent's permissions on it"
        errors[rel] = why

    # --- readiness ---------------------------------------------------------------

    def _check(self, rel: str, tr: _Track, now: float) -> None:
        if tr.ready or rel in self._inflight:
            return
        quiet_for = now - tr.last_change
        if tr.kind == "temp" or tr.deferred:
            ready = quiet_for >= self.partial_timeout
        else:
            ready = tr.confirmed or quiet_for >= self.quiet
        if ready:
            tr.ready = True
            self._ready.append(rel)

    def poll(self) -> None:
        """Re-stat files still settling and move the complete ones to the ready queue."""
        now = time.monotonic()
        with self._lock:
            items = [(rel, tr) for rel, tr in self._tracks.items() if not tr.ready and rel not in self._inflight]
        for rel, tr in items:
            slow = tr.kind == "temp" or tr.deferred
            if slow and now - tr.last_stat < 1.0:
                with self._lock:
                    self._check(rel, tr, now)
                continue
            try:
                key = _key(os.lstat(self.inbox / rel))
            except OSError:
                with self._lock:
                    self._tracks.pop(rel, None)
                continue
            with self._lock:
                tr.last_stat = now
                if key != tr.key:
                    tr.key, tr.last_change, tr.confirmed, tr.deferred, tr.provisional = key, now, False, False, False
                self._check(rel, tr, now)

    def take(self, n: int) -> list[Candidate]:
        """Up to n ready files, oldest first; they stay 'in flight' until `done`."""
        out: list[Candidate] = []
        now = time.monotonic()
        with self._lock:
            while self._ready and len(out) < n:
                rel = self._ready.popleft()
                tr = self._tracks.get(rel)
                if tr is None or not tr.ready:
                    continue
                c = Candidate(rel, self.inbox / rel, tr.received_at, now, final=tr.deferred or tr.kind == "temp",
                              abandoned=tr.kind == "temp", provisional=tr.provisional, key=tr.key)
                self._inflight[rel] = c
                out.append(c)
        return out

    def done(self, rel: str, *, settle: bool = False, defer: bool = False, retry: bool = False,
             recheck: bool = False, note: str = "") -> None:
        """The pipeline is finished with a file.

        settle: the file stays in the inbox on purpose (after=keep, or it could
        not be moved); ignore it until it changes. defer: it looked incomplete;
        wait for changes, and quarantine it after partial_timeout. retry: hand
        it out again (its twin was quarantined, so it needs its own decode).
        recheck: a provisional take failed its checks; apply the quiet period.
        """
        with self._lock:
            self._inflight.pop(rel, None)
            tr = self._tracks.get(rel)
            if recheck and tr is not None:
                tr.ready = tr.confirmed = tr.provisional = False
                return
            if defer and tr is not None:
                tr.ready, tr.deferred, tr.confirmed, tr.note = False, True, False, note
                self._check(rel, tr, time.monotonic())  # already unchanged for partial_timeout: judge it now
                return
            if retry and tr is not None:
                tr.ready = True
                self._ready.appendleft(rel)
                return
            self._tracks.pop(rel, None)
            if settle:
                try:
                    self._settled[rel] = _key(os.lstat(self.inbox / rel))
                except OSError:
                    pass

    # --- numbers -----------------------------------------------------------------

    @property
    def inflight(self) -> int:
        with self._lock:
            return len(self._inflight)

    @property
    def backlog(self) -> int:
        """Files waiting in the inbox for the pipeline (excluding those already in flight and temp files)."""
        with self._lock:
            return sum(1 for rel, t in self._tracks.items() if rel not in self._inflight and t.kind != "temp")

    def outstanding(self) -> int:
        """Image files not yet finished (tracked or in flight); temp files excluded."""
        with self._lock:
            return sum(1 for r, t in self._tracks.items() if t.kind != "temp" or t.ready or r in self._inflight) + \
                sum(1 for r in self._inflight if r not in self._tracks)

    def waiting(self) -> list[tuple[str, str, float]]:
        """(rel, why, seconds since it last changed) of files left waiting: ones that looked incomplete
        (deferred: quarantined once unchanged for partial_timeout) and temp-named uploads; oldest change first.

        A one-shot scan ends with these still in the inbox and names them, rather than waiting
        partial_timeout itself or quarantining a file whose copy may still be running."""
        now = time.monotonic()
        with self._lock:
            out = [(rel, t.note or "looks incomplete" if t.deferred else "temporary name", now - t.last_change)
                   for rel, t in self._tracks.items()
                   if not t.ready and rel not in self._inflight and (t.deferred or t.kind == "temp")]
        return [(_short(rel) + "/", why, 0.0) for rel, why in self.unlisted.items()] + sorted(out, key=lambda x: -x[2])

    def deferred(self) -> int:
        """Image files that looked incomplete and wait for partial_timeout (temp names are not counted)."""
        with self._lock:
            return sum(1 for rel, t in self._tracks.items()
                       if t.deferred and not t.ready and rel not in self._inflight and t.kind != "temp")

    def waiting_temp(self) -> int:
        with self._lock:
            return sum(1 for t in self._tracks.values() if t.kind == "temp" and not t.ready)


# --- taking the bytes ----------------------------------------------------------------------

class Vanished(Exception):
    """The file left the inbox before it could be read (a person took it back): no outcome is owed."""


@dataclass
class FileRead:
    data: bytes | None
    sha256: str | None
    size: int | None
    problem: tuple[str, str] | None = None  # (code, reason) when the file must be quarantined
    ident: Ident | None = None  # (st_dev, st_ino) of the inbox entry that was read: the move checks it


def read_file(path: Path, inbox_real: Path, max_bytes: int) -> FileRead:
    """Read and hash an inbox file without following links out of the inbox or blocking on pipes.

    Every folder between the inbox and the file is opened without following
    symlinks (fsafe.walk_dirs): a sub-folder swapped for a link to another
    folder after the listing makes the file count as gone from the inbox,
    never read from elsewhere. A link (as the last component) that resolves
    inside the inbox is read through the same walk to its real place (its
    target is screened on its own too, so the link becomes a duplicate);
    anything else that is not a regular file is reported as a problem, never
    opened.
    """
    here = Path(os.path.abspath(path))
    if not here.is_relative_to(inbox_real):  # given through a linked folder (the benchmark's own files)
        here = Path(os.path.realpath(here.parent)) / here.name
    if not here.is_relative_to(inbox_real) or here == inbox_real:
        raise Vanished  # not below the inbox (cannot happen for paths intake hands out)
    rel = here.relative_to(inbox_real).as_posix()
    try:
        ls = fsafe.lstat_beneath(inbox_real, rel)
    except (FileNotFoundError, fsafe.Escaped):
        raise Vanished from None
    except OSError as e:
        return FileRead(None, None, None, ("unreadable", f"cannot inspect the file ({e.strerror}); check the "
                                                         "agent's permissions on the inbox"))
    entry = fsafe.ident(ls)
    not_regular = FileRead(None, None, None, ("not_regular", "not a regular file (a pipe, socket or device); only "
                                                             "image files can be screened"), entry)
    if not (st.S_ISREG(ls.st_mode) or st.S_ISLNK(ls.st_mode)):
        return not_regular  # never opened: opening a device or a pipe can block or have side effects
    target = rel
    if st.S_ISLNK(ls.st_mode):
        def link_problem(text: str) -> FileRead:
            return FileRead(None, None, None, ("symlink", text), entry)

        try:
            points_to = os.readlink(path)
        except FileNotFoundError:
            raise Vanished from None
        except OSError as e:
            return FileRead(None, None, None, ("unreadable", f"cannot read the symbolic link ({e.strerror})"), entry)
        real = Path(os.path.realpath(path))
        # Decided from the path alone: a target outside the inbox is never opened, listed or even stat()ed.
        if real == inbox_real:
            return link_problem("symbolic link to a folder (the inbox itself): links to folders are not followed; "
                                "copy the images themselves into the inbox")
        if not real.is_relative_to(inbox_real):
            return link_problem(f"symbolic link to {real}, outside the inbox: links are not followed out of the "
                                "inbox for safety; copy the image itself into the inbox")
        target = real.relative_to(inbox_real).as_posix()
        try:
            target_mode = fsafe.lstat_beneath(inbox_real, target).st_mode
        except OSError as e:
            if e.errno == errno.ELOOP or isinstance(e, fsafe.Escaped):
                return link_problem(f"symbolic link loop or a chain of links (points to {points_to}); remove the "
                                    "link and copy the image itself into the inbox")
            return link_problem(f"broken symbolic link (points to {points_to}, which does not exist); copy the "
                                "image itself into the inbox")
        if st.S_ISDIR(target_mode):
            return link_problem("symbolic link to a folder: links to folders are not followed; copy the images "
                                "themselves into the inbox")
        if st.S_ISLNK(target_mode):
            return link_problem(f"symbolic link loop or a chain of links (points to {points_to}); remove the link "
                                "and copy the image itself into the inbox")
        if not st.S_ISREG(target_mode):
            return not_regular
    try:
        fd, fs = fsafe.open_beneath(inbox_real, target)
    except FileNotFoundError:
        raise Vanished from None
    except fsafe.Escaped:
        if target == rel:
            raise Vanished from None  # a folder on the way was swapped for a link: the file left the inbox
        return FileRead(None, None, None, ("symlink", "the link's target was moved behind another link while "
                                                      "being read; copy the image itself into the inbox"), entry)
    except OSError as e:
        if e.errno == errno.ELOOP:
            return FileRead(None, None, None, ("symlink", "the file was replaced by a symbolic link while being "
                                                          "read; copy the image itself into the inbox"), entry)
        return FileRead(None, None, None, ("unreadable", f"cannot read the file ({e.strerror}); give the agent's "
                                                         "user read access, then move it back into the inbox"), entry)
    with os.fdopen(fd, "rb") as f:
        if not st.S_ISREG(fs.st_mode):
            return FileRead(None, None, None, ("not_regular", "not a regular file (a pipe, socket or device); only "
                                                              "image files can be screened"), entry)
        if target == rel and fsafe.ident(fs) != entry:
            entry = fsafe.ident(fs)  # replaced between the lstat and the open: what was read is what counts
        try:
            if fs.st_size > max_bytes:
                # Hashed up to the size seen at the open: a file that keeps growing (a writer that never stops)
                # used to be read until it stopped, i.e. for ever, holding a worker.
                h = hashlib.sha256()
                left = fs.st_size
                while left > 0 and (chunk := f.read(min(1 << 20, left))):
                    h.update(chunk)
                    left -= len(chunk)
                return FileRead(None, h.hexdigest(), fs.st_size, (
                    "too_large_file", f"file is {fs.st_size / 2**20:.1f} MiB, above max_file_mb "
                                      f"{max_bytes / 2**20:g}; send a smaller export or raise max_file_mb"), entry)
            data = f.read(max_bytes + 1)
        except OSError as e:
            return FileRead(None, None, None, ("unreadable", f"reading the file failed ({e.strerror}); check the "
                                                             "disk or share, then move it back into the inbox"), entry)
    return FileRead(data, hashlib.sha256(data).hexdigest(), len(data), None, entry)


def _short(rel: str, keep: int = 120) -> str:
    """A path for a message: a folder nested past PATH_MAX is thousands of characters long."""
    return rel if len(rel) <= keep else f"{rel[:keep // 2]}...{rel[-keep // 2:]} ({len(rel)} characters)"
