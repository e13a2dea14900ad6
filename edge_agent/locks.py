"""One agent per inbox and per database: exclusive locks held for the life of the process.

Why: two `scan`/`run` processes on the same inbox and database each take the
same files and both record them (583 of 600 recorded twice in the report).
SQLite's own locking only serialises the commits. So each agent takes an
exclusive `flock` on a lock file next to the database (`<db>.lock`, which
also says who holds it: pid, command, start time) and on the inbox folder
itself (no file is created in the inbox, which must hold only what people
put there). A second agent fails at once, exit 2, naming the holder. The
kernel drops the locks when the process dies, even by SIGKILL, so a crash
never leaves a stale lock behind. Locks on network file systems may not work
across machines; run one agent per inbox.
"""
from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import shlex
import sys
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

log = logging.getLogger(__name__)


class Busy(RuntimeError):
    """Another process holds the lock; the message names it and says what to do."""


@dataclass
class Lock:
    fd: int
    path: Path

    def release(self) -> None:
        if self.fd >= 0:
            try:
                fcntl.flock(self.fd, fcntl.LOCK_UN)
            except OSError:
                pass  # never locked (unsupported): closing is all there is to do
            finally:
                os.close(self.fd)
                self.fd = -1


def _me() -> dict[str, object]:
    return {"pid": os.getpid(), "command": shlex.join(sys.argv),
            "started_at": datetime.now(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")}


def _proc_holder(fd: int) -> dict[str, object] | None:
    """Who holds a flock on fd's file, from /proc/locks (Linux); None when it cannot be told."""
    s = os.fstat(fd)
    want = f"{os.major(s.st_dev):02x}:{os.minor(s.st_dev):02x}:{s.st_ino}"
    try:
        lines = Path("/proc/locks").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        f = line.split()
        if len(f) >= 6 and f[1] == "FLOCK" and f[5] == want and f[4].isdigit() and int(f[4]) != os.getpid():
            return _describe_pid(int(f[4]))
    return None


def _describe_pid(pid: int) -> dict[str, object]:
    out: dict[str, object] = {"pid": pid}
    try:
        out["command"] = shlex.join(x.decode(errors="replace")
                                    for x in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0") if x)
        ticks = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
        btime = next(int(x.split()[1]) for x in Path("/proc/stat").read_text().splitlines() if x.startswith("btime"))
        started = datetime.fromtimestamp(btime + ticks / os.sysconf("SC_CLK_TCK"), timezone.utc)
        out["started_at"] = started.isoformat(timespec="seconds").replace("+00:00", "Z")
    except (OSError, ValueError, IndexError, StopIteration):
        pass
    return out


def _holder_text(h: dict[str, object] | None) -> str:
    if not h:
        return "another process"
    parts = [f"pid {h.get('pid', '?')}"]
    if h.get("command"):
        parts.append(f"command `{h['command']}`")
    if h.get("started_at"):
        parts.append(f"started {h['started_at']}")
    return "another process (" + ", ".join(parts) + ")"


def _take(fd: int, what: Path) -> bool:
    """True: locked (or locking unsupported there, with a warning); False: another process holds it."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError as e:
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            return False
        # A file system without flock (some network mounts: ENOLCK, EBADF, EOPNOTSUPP): run unlocked, say so.
        log.warning("cannot lock %s (%s): this file system does not support locks; make sure no other agent uses "
                    "it", what, e.strerror or e)
        return True


def lock_database(db: Path) -> Lock:
    """Exclusive lock on `<db>.lock` (created 0600), with this process's pid/command/start time in it."""
    path = db.with_name(db.name + ".lock")
    try:
        # exist_ok: two agents started together both find the folder missing; the loser of the mkdir race
        # must go on to the lock (and be refused there, naming the holder), not fail on "File exists".
        path.parent.mkdir(parents=True, mode=0o700, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except OSError as e:
        raise Busy(f"cannot create the lock file {path} ({e.strerror}); make the database's folder writable by "
                   "the agent's user") from None
    if not _take(fd, path):
        try:
            raw = os.pread(fd, 4096, 0)
            holder = json.loads(raw.decode("utf-8")) if raw.strip() else None
        except (OSError, ValueError):
            holder = None
        holder = holder if isinstance(holder, dict) else _proc_holder(fd)
        os.close(fd)
        raise Busy(f"the database {db} is in use by {_holder_text(holder)}: only one edge-agent may use a "
                   "database at a time; stop the other one (systemctl stop edge-agent) or pass another --db")
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(_me()) + "\n").encode(), 0)
    return Lock(fd, path)


def lock_inbox(inbox: Path) -> Lock:
    """Exclusive lock on the inbox folder itself (nothing is written into the inbox)."""
    try:
        fd = os.open(inbox, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as e:
        raise Busy(f"cannot open the inbox {inbox} ({e.strerror}); check it exists and the agent may read it") \
            from None
    if not _take(fd, inbox):
        holder = _proc_holder(fd)
        os.close(fd)
        raise Busy(f"the inbox {inbox} is being screened by {_holder_text(holder)}: two agents on one inbox would "
                   "screen every file twice; stop the other one (systemctl stop edge-agent) or use another inbox")
    return Lock(fd, inbox)
