"""Remove inbox sub-folders the agent emptied, once nobody else has touched them for the quiet period.

Why: staff drop whole folders (one per patient, per day) into the inbox; after
their images moved to processed/ the empty folders stayed behind and piled
up. Only folders the agent itself emptied are candidates (an empty folder a
person made to fill later is theirs), never the inbox itself, and never one
that someone else changed within `quiet_seconds`: a copy in progress creates
the folder, then its files, and removing the folder between the two would
make the copy fail.

"Changed by someone else" is told from the folder's mtime: the agent notes
the mtime a folder had before it first took a file out of it (the last change
by someone else) and the mtime its own removal left; if the folder's mtime is
still the agent's, the folder's age is counted from the earlier one. Any
other change (a new file, a rename) moves the mtime and restarts the quiet
period. The removal itself is `rmdir`, which fails on a folder that is not
empty, and reaches the folder through fsafe's walk that never follows a
symbolic link, so nothing outside the inbox can be removed.
"""
from __future__ import annotations

import errno
import logging
import os
import stat as st
import time
from pathlib import Path, PurePosixPath

from . import fsafe

log = logging.getLogger(__name__)

MAX_TRACKED = 10_000  # folders remembered at most (paths only); beyond that the newest are not tracked


class EmptyFolders:
    """Inbox sub-folders that lost a file to the agent: removed by `sweep` once empty and quiet.

    Used by one thread only (the committer's), like the moves that feed it.
    """

    def __init__(self, inbox: Path, quiet_seconds: float) -> None:
        self.inbox = inbox
        self.quiet_ns = int(max(quiet_seconds, 0.0) * 1e9)
        # folder (inbox-relative) -> (mtime_ns of the last change by someone else, mtime_ns the agent left)
        self._dirs: dict[str, tuple[int, int | None]] = {}
        # Folders found not empty (more files to come, or files the agent leaves alone): remembered, so that
        # the agent's own earlier moves do not count as a recent change, but not looked at until the agent
        # takes another file out of them.
        self._dormant: dict[str, tuple[int, int | None]] = {}
        self.removed = 0

    def _mtime(self, rel: str) -> int | None:
        try:
            s = fsafe.lstat_beneath(self.inbox, rel)
        except OSError:
            return None
        return s.st_mtime_ns if st.S_ISDIR(s.st_mode) else None

    @staticmethod
    def _parent(rel: str) -> str | None:
        parent = PurePosixPath(rel).parent.as_posix()
        return None if parent in ("", ".") else parent

    def before(self, rel_file: str) -> None:
        """The agent is about to take `rel_file` out of the inbox: note its folder's last foreign change."""
        parent = self._parent(rel_file)
        if parent is None:
            return
        m = self._mtime(parent)
        if m is None:
            return
        known = self._dirs.get(parent) or self._dormant.pop(parent, None)
        if known is not None and known[1] == m:  # unchanged since the agent's own last removal
            self._dirs[parent] = (known[0], None)
        elif known is not None or len(self._dirs) < MAX_TRACKED:
            self._dirs[parent] = (m, None)

    def after(self, rel_file: str) -> None:
        """`rel_file` left the inbox (or tried to): note the mtime the agent's change left on its folder."""
        parent = self._parent(rel_file)
        known = self._dirs.get(parent) if parent is not None else None
        if parent is None or known is None:
            return
        self._dirs[parent] = (known[0], self._mtime(parent))

    def pending(self) -> list[str]:
        return sorted(self._dirs)

    def sweep(self, now_ns: int | None = None) -> list[str]:
        """Remove the tracked folders that are empty and quiet, deepest first (a parent emptied by removing
        its last sub-folder becomes a candidate too). Returns the folders removed (inbox-relative)."""
        removed: list[str] = []
        while True:
            got = self._pass(time.time_ns() if now_ns is None else now_ns)
            if not got:
                return removed
            removed += got

    def _pass(self, now_ns: int) -> list[str]:
        removed: list[str] = []
        for rel in sorted(self._dirs, key=lambda r: (-len(PurePosixPath(r).parts), r)):
            entry = self._dirs.get(rel)
            if entry is None:
                continue
            foreign, ours = entry
            m = self._mtime(rel)
            if m is None:  # gone (or no longer a real folder): nothing to do
                del self._dirs[rel]
                continue
            last_foreign = foreign if m == ours else m
            if now_ns - last_foreign < self.quiet_ns:
                continue  # changed recently by someone else: maybe a copy in progress; try again later
            parent = self._parent(rel)
            saved = (self._dirs.get(parent), self._dormant.get(parent)) if parent is not None else (None, None)
            self.before(rel)
            try:
                with fsafe.parent_fd(self.inbox, rel) as (fd, name):
                    os.rmdir(name, dir_fd=fd)
            except OSError as e:
                known = self._dirs.pop(rel, None)
                if e.errno in (errno.ENOTEMPTY, errno.EEXIST) and known is not None:
                    if len(self._dormant) >= MAX_TRACKED:
                        self._dormant.pop(next(iter(self._dormant)))
                    self._dormant[rel] = known
                if e.errno not in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOENT, errno.ENOTDIR, errno.ELOOP,
                                   errno.EBUSY) and not isinstance(e, fsafe.Escaped):
                    log.warning("cannot remove the empty inbox folder %s (%s); remove it by hand or give the "
                                "agent write access to its parent", self.inbox / rel, e.strerror or e)
                if parent is not None:  # noted by before() above, but nothing was removed: as it was
                    for table, value in zip((self._dirs, self._dormant), saved):
                        if value is None:
                            table.pop(parent, None)
                        else:
                            table[parent] = value
                continue
            del self._dirs[rel]
            self.after(rel)
            removed.append(rel)
            self.removed += 1
            log.debug("removed the empty inbox folder %s", self.inbox / rel)
        return removed
