"""Who may read what the agent writes: its own user only, or also one group of clinic staff.

Why: the results database and the screened images are patient data. By
default only the agent's user reads them (database 0600, folders 0700). A
clinic needs its staff to read results and open the processed images without
`sudo`, and nobody else to: `share_group` names that group. With it set,
everything the agent creates for people to read gets the group and
group-read, never anything for others:

- the database and its -wal/-shm files: 0640, group share_group (SQLite gives
  -wal/-shm the database file's permission bits; their group is set here);
- folders under processed_dir (day folders, duplicates/, the inbox's
  sub-folders) and a database folder it creates: 0750, group share_group;
- images it stores as new files (copies across file systems, hard-linked
  inbox files): 0640, group share_group. An image renamed out of the inbox
  keeps its owner and its mode (only a file's owner may change them): it is
  readable by the group through the inbox's setgid group and default ACL
  (docs/install.md).

The quarantine folder stays the agent's own (0700, files 0600): what is in it
was refused, and `edge-agent quarantine` lists it with reasons.

Modes are set explicitly (fchmod after creating), so they do not depend on the
umask; the group is set with fchown, which an unprivileged process may do only
to a group it belongs to, so the agent checks that at start. The set-group-ID
bit is never set by the agent (the unit's RestrictSUIDSGID= forbids it); a
folder inherits it from a setgid parent (tmpfiles makes processed/ 2750).
"""
from __future__ import annotations

import errno
import grp
import logging
import os
import stat as st
from dataclasses import dataclass
from pathlib import Path

from .config import ConfigError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Share:
    """The group that may read results and images (gid None: nobody but the agent's user)."""

    gid: int | None = None
    name: str = ""

    @property
    def dir_mode(self) -> int:
        return 0o750 if self.gid is not None else 0o700

    @property
    def file_mode(self) -> int:
        return 0o640 if self.gid is not None else 0o600

    def describe(self) -> str:
        return f"group {self.name} (gid {self.gid})" if self.gid is not None else "the agent's user only"

    def fix_fd(self, fd: int, directory: bool) -> None:
        """Give an open file or folder the shared group and mode, if the agent owns it (only the owner may);
        OSError is left to the caller."""
        s = os.fstat(fd)
        if s.st_uid != os.geteuid():
            return
        if self.gid is not None and s.st_gid != self.gid:
            os.fchown(fd, -1, self.gid)
            s = os.fstat(fd)  # a group change may clear the set-group-ID bit
        want = self.dir_mode if directory else self.file_mode
        if (s.st_mode & 0o777) == want:
            return
        keep = s.st_mode & st.S_ISGID if directory else 0
        try:
            os.fchmod(fd, want | keep)
        except PermissionError:
            if not keep:
                raise
            os.fchmod(fd, want)  # RestrictSUIDSGID= refuses any mode with the setgid bit, even one kept

    def fix_at(self, dir_fd: int, name: str) -> None:
        """fix_fd for the regular file `name` in `dir_fd`, never through a symbolic link; a link, a file that
        cannot be opened or changed is left as it is (logged): the folder's mode still keeps strangers out."""
        try:
            fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dir_fd)
        except OSError as e:
            if e.errno != errno.ELOOP:
                log.debug("cannot open %s to set its group/mode: %s", name, e)
            return
        try:
            if st.S_ISREG(os.fstat(fd).st_mode):
                self.fix_fd(fd, directory=False)
        except OSError as e:
            log.warning("cannot give the stored image %s to %s (%s); staff may not be able to open it",
                        name, self.describe(), e.strerror or e)
        finally:
            os.close(fd)

    def fix_created_dir(self, fd: int) -> None:
        """fix_fd for a folder the agent just created; a failure is logged, never fatal (the folder's mode
        from mkdir keeps strangers out either way)."""
        try:
            self.fix_fd(fd, directory=True)
        except OSError as e:
            log.warning("cannot give a new folder to %s (%s); staff may not be able to open it",
                        self.describe(), e.strerror or e)

    def fix_path(self, path: Path, directory: bool = False) -> None:
        """The same as fix_fd, by path, for what the agent made itself (the database and its side files, its own
        folders). By path on purpose: opening and closing a database file that SQLite has open in this process
        would drop SQLite's POSIX locks on it (they belong to the process, and any close releases them)."""
        try:
            s = os.lstat(path)
        except FileNotFoundError:
            return
        if s.st_uid != os.geteuid() or not (st.S_ISDIR(s.st_mode) if directory else st.S_ISREG(s.st_mode)):
            return  # not ours to change, or not what it should be (a link): leave it
        if self.gid is not None and s.st_gid != self.gid:
            os.chown(path, -1, self.gid, follow_symlinks=False)
            s = os.lstat(path)
        want = self.dir_mode if directory else self.file_mode
        if (s.st_mode & 0o777) != want:
            keep = s.st_mode & st.S_ISGID if directory else 0
            try:
                os.chmod(path, want | keep)
            except PermissionError:
                if not keep:
                    raise
                os.chmod(path, want)

    def make_dirs(self, path: Path) -> None:
        """mkdir -p with dir_mode and the group on every folder it creates (existing ones are left alone)."""
        missing = []
        p = Path(path)
        while not p.exists():
            missing.append(p)
            if p.parent == p:
                break
            p = p.parent
        for d in reversed(missing):
            try:
                os.mkdir(d, self.dir_mode)
            except FileExistsError:
                continue
            self.fix_path(d, directory=True)


def resolve_share(group: str | int | None) -> Share:
    """The Share for the `share_group` setting (a group name or number; empty: private). ConfigError when
    the group does not exist or the agent cannot hand files to it (not one of its groups)."""
    text = str(group).strip() if group is not None else ""
    if not text:
        return Share()
    try:
        if text.isdigit():
            gid = int(text)
            try:
                name = grp.getgrgid(gid).gr_name
            except KeyError:
                name = text
        else:
            gid, name = grp.getgrnam(text).gr_gid, text
    except KeyError:
        raise ConfigError(f"share_group {text!r} is not a group on this system: create it (groupadd {text}) and add "
                          "the staff who read results to it, or fix share_group (empty: results readable by the "
                          "agent's user only)") from None
    if os.geteuid() != 0 and gid != os.getegid() and gid not in os.getgroups():
        raise ConfigError(f"share_group {name!r} (gid {gid}) is not one of the agent's groups, so it cannot give its "
                          f"files to it: run the agent with that group (Group={name} in the systemd unit, or add "
                          "the agent's user to the group), or set share_group to the agent's own group")
    return Share(gid, name)
