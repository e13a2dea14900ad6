"""File operations that cannot be redirected out of the folder they are meant for.

Why: `O_NOFOLLOW` protects only the last component of a path. A sub-folder of
the inbox replaced by a symbolic link between the listing and the open (or
between the screening and the move) would make a path-based open, rename or
unlink act on a file outside the inbox. Everything here therefore works
relative to directory file descriptors: a path below a root is opened one
component at a time with `O_NOFOLLOW | O_DIRECTORY`, so any symlink on the way
fails the walk (ELOOP/ENOTDIR) instead of being followed.

Moves never replace an existing file: `renameat2(RENAME_NOREPLACE)` where the
kernel and file system have it, else `link` + `unlink` (also atomic about the
destination name), so two images with the same name can never overwrite each
other in processed/ or quarantine/.

Hard links: an inbox file whose inode has other names (st_nlink > 1) is
screened like any other file (its content is what any reader of that name
gets), but its inode is never moved into processed/ or quarantine/: whoever
holds the other name could rewrite the stored image after it was screened.
It is copied (the copy verified against the screened sha256) and only the
inbox name is removed; `after = "delete"` removes only the inbox name, never
the other names or their content. The agent relies on the kernel's
fs.protected_hardlinks (on by default) to stop a user from linking a file
they cannot read themselves into the inbox.

Roots: the inbox folder itself is pinned at start (pin_root): every open of it
checks that the path still names the folder the agent started with. An inbox
renamed away, deleted and created again, or replaced by a symbolic link while
the agent runs would otherwise be reopened by path at the next operation and
the agent would read, record and move files from wherever the path now leads.
A pinned root that changed raises RootMoved (an Escaped: the file is treated
as gone from the inbox, never touched) and the agent stops (root_change).
"""
from __future__ import annotations

import ctypes
import errno
import hashlib
import os
import stat as st
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .share import Share

RENAME_NOREPLACE = 1
DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
# A name component that is not a plain folder (a symlink swapped in, a file where a folder was).
SWAPPED_ERRNOS = {errno.ELOOP, errno.ENOTDIR}
Ident = tuple[int, int]  # (st_dev, st_ino)


class InboxError(OSError):
    """Removing the inbox name failed (the inbox is read-only or not writable for the agent): the inbox's
    fault, not the output folder's, so the agent must say so and wait for the inbox, not for processed/."""


def _unlink_inbox_name(name: str, dir_fd: int) -> None:
    try:
        os.unlink(name, dir_fd=dir_fd)
    except OSError as e:
        if e.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
            raise InboxError(e.errno, e.strerror, name) from None
        raise


class Escaped(OSError):
    """A folder on the way to the file is not a real folder any more (a symlink was swapped in)."""


def ident(s: os.stat_result) -> Ident:
    return (s.st_dev, s.st_ino)


class RootMoved(Escaped):
    """The pinned root folder (the inbox) is no longer the folder at its path (renamed, deleted, replaced)."""


_pins: dict[str, Ident] = {}
_pins_lock = threading.Lock()


def pin_root(root: Path, fd: int | None = None) -> None:
    """Remember which folder `root` names now (from fd when given: the folder the agent locked)."""
    s = os.fstat(fd) if fd is not None else os.stat(root)
    with _pins_lock:
        _pins[os.fspath(root)] = ident(s)


def unpin_root(root: Path) -> None:
    with _pins_lock:
        _pins.pop(os.fspath(root), None)


def root_change(root: Path) -> str | None:
    """What happened to a pinned root since it was pinned, in words; None if it is still the same folder
    (or is not pinned)."""
    with _pins_lock:
        want = _pins.get(os.fspath(root))
    if want is None:
        return None
    try:
        ls = os.lstat(root)
    except FileNotFoundError:
        return "deleted or renamed away"
    except OSError as e:
        return f"made unreachable ({e.strerror})"
    if st.S_ISLNK(ls.st_mode):
        try:
            to = os.readlink(root)
        except OSError:
            to = "?"
        return f"replaced by a symbolic link (to {to})"
    try:
        s = os.stat(root)  # a folder on the way to the root may have been swapped: compare what the path reaches
    except OSError as e:
        return f"made unreachable ({e.strerror})"
    if ident(s) != want:
        return ("replaced by another folder (deleted and created again, renamed, or a folder on its path "
                "swapped)") if st.S_ISDIR(s.st_mode) else "replaced by a file that is not a folder"
    return None


def open_root(root: Path) -> int:
    """An O_DIRECTORY fd for root; for a pinned root, only if it is still the folder that was pinned."""
    try:
        fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except (FileNotFoundError, NotADirectoryError):
        if root_change(root) is not None:  # the pinned inbox itself is gone: the file left the inbox
            raise RootMoved(errno.ENOTDIR, f"the inbox {root} is no longer there", str(root)) from None
        raise
    with _pins_lock:
        want = _pins.get(os.fspath(root))
    if want is not None and ident(os.fstat(fd)) != want:
        os.close(fd)
        raise RootMoved(errno.ENOTDIR, f"the inbox {root} is no longer the folder the agent started with", str(root))
    return fd


def _parts(rel: str | PurePosixPath) -> tuple[str, ...]:
    parts = PurePosixPath(rel).parts
    if not parts or any(p in ("", ".", "..", "/") for p in parts):
        raise OSError(errno.EINVAL, "not a plain relative path", str(rel))
    return parts


def walk_dirs(root_fd: int, parts: tuple[str, ...] | list[str], create: bool = False, mode: int = 0o777,
              on_create: Callable[[int], None] | None = None) -> int:
    """A new fd for root/parts..., opened one component at a time without following any symlink.

    create: make missing folders (with `mode`; on_create(fd) is called for each
    folder made here, e.g. to set its group). A symlink or a file on the way
    raises Escaped.
    """
    fd = os.dup(root_fd)
    try:
        for part in parts:
            try:
                nfd = os.open(part, DIR_FLAGS, dir_fd=fd)
            except FileNotFoundError:
                if not create:
                    raise
                made = True
                try:
                    os.mkdir(part, mode, dir_fd=fd)
                except FileExistsError:
                    made = False
                nfd = os.open(part, DIR_FLAGS, dir_fd=fd)
                if made and on_create is not None:
                    on_create(nfd)
            except OSError as e:
                if e.errno in SWAPPED_ERRNOS:
                    raise Escaped(e.errno, f"{part} is not a real folder (a symbolic link or a file)", part) from None
                raise
            os.close(fd)
            fd = nfd
        return fd
    except BaseException:
        os.close(fd)
        raise


@contextmanager
def parent_fd(root: Path, rel: str | PurePosixPath, create: bool = False, mode: int = 0o777) -> Iterator[tuple[int, str]]:
    """(fd of the folder holding root/rel, last name), reached without following symlinks below root."""
    parts = _parts(rel)
    rfd = open_root(root)
    try:
        fd = walk_dirs(rfd, parts[:-1], create, mode)
    finally:
        os.close(rfd)
    try:
        yield fd, parts[-1]
    finally:
        os.close(fd)


def lstat_beneath(root: Path, rel: str | PurePosixPath) -> os.stat_result:
    """lstat of root/rel without following symlinks on the way (Escaped if a folder was swapped)."""
    with parent_fd(root, rel) as (fd, name):
        return os.stat(name, dir_fd=fd, follow_symlinks=False)


def open_beneath(root: Path, rel: str | PurePosixPath) -> tuple[int, os.stat_result]:
    """Open root/rel for reading (never a symlink, never blocking on a pipe); returns (fd, fstat)."""
    with parent_fd(root, rel) as (dfd, name):
        fd = os.open(name, FILE_FLAGS, dir_fd=dfd)
    try:
        return fd, os.fstat(fd)
    except BaseException:
        os.close(fd)
        raise


# --- renaming without replacing -----------------------------------------------------------

def _renameat2() -> object | None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):  # not glibc >= 2.28 / not Linux
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_RENAMEAT2 = _renameat2()


def rename_noreplace(src_fd: int, src: str, dst_fd: int, dst: str) -> None:
    """Rename src (in folder src_fd) to dst (in folder dst_fd); FileExistsError if dst exists. Never replaces.

    renameat2(RENAME_NOREPLACE) where available; otherwise link + unlink (the
    link fails with EEXIST just the same); on file systems without hard links a
    check-then-rename, the best that is possible there.
    """
    if _RENAMEAT2 is not None:
        r = _RENAMEAT2(src_fd, os.fsencode(src), dst_fd, os.fsencode(dst), RENAME_NOREPLACE)  # type: ignore[operator]
        if r == 0:
            return
        err = ctypes.get_errno()
        if err not in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
            raise OSError(err, os.strerror(err), dst)
    try:
        os.link(src, dst, src_dir_fd=src_fd, dst_dir_fd=dst_fd, follow_symlinks=False)
    except OSError as e:
        if e.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOSYS, errno.EMLINK):
            raise
        try:
            os.stat(dst, dir_fd=dst_fd, follow_symlinks=False)
        except FileNotFoundError:
            os.rename(src, dst, src_dir_fd=src_fd, dst_dir_fd=dst_fd)
            return
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), dst) from None
    os.unlink(src, dir_fd=src_fd)


def copy_noreplace(src_fd: int, src: str, dst_fd: int, dst: str, sha256: str | None, private: bool) -> None:
    """Copy src into a new file dst (fsynced; FileExistsError if dst exists), then remove the name src.

    Used across file systems and for hard-linked files (a new inode: nobody
    else can change the stored copy). With sha256 given, the copy must hold
    that content, else ValueError and nothing is removed.
    """
    s = os.stat(src, dir_fd=src_fd, follow_symlinks=False)
    tmp = f".{dst[:200]}.edge-agent-tmp"
    if st.S_ISLNK(s.st_mode):  # a quarantined link: the link itself, not its target
        with _suppress_missing():
            os.unlink(tmp, dir_fd=dst_fd)
        os.symlink(os.readlink(src, dir_fd=src_fd), tmp, dir_fd=dst_fd)
    else:
        fd = os.open(src, FILE_FLAGS, dir_fd=src_fd)
        with _suppress_missing():
            os.unlink(tmp, dir_fd=dst_fd)
        try:
            out = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                          0o600 if private else st.S_IMODE(s.st_mode) & 0o777, dir_fd=dst_fd)
            try:
                h = hashlib.sha256()
                while chunk := os.read(fd, 1 << 20):
                    h.update(chunk)
                    view = memoryview(chunk)
                    while view:
                        view = view[os.write(out, view):]
                os.fsync(out)
            finally:
                os.close(out)
            if sha256 is not None and h.hexdigest() != sha256:
                raise ValueError("the file changed while it was being copied")
        except BaseException:
            with _suppress_missing():
                os.unlink(tmp, dir_fd=dst_fd)  # a disk that filled up mid-copy must not keep half a file
            raise
        finally:
            os.close(fd)
    try:
        rename_noreplace(dst_fd, tmp, dst_fd, dst)
    except BaseException:
        with _suppress_missing():
            os.unlink(tmp, dir_fd=dst_fd)
        raise
    fsync_dir(dst_fd)  # the copy's name is durable before the only other copy loses its name
    _unlink_inbox_name(src, src_fd)


@contextmanager
def _suppress_missing() -> Iterator[None]:
    try:
        yield
    except FileNotFoundError:
        pass


def fsync_dir(fd: int) -> None:
    try:
        os.fsync(fd)
    except OSError:  # some file systems do not fsync folders
        pass


@dataclass(frozen=True)
class Dest:
    """Where a file should go: base/day/rel (rel: its inbox-relative path); tag: a short content tag used
    to make a taken name unique, and as the hash-based fallback name."""

    base: Path
    day: str
    rel: str
    tag: str
    prefer: str = ""  # relative to base: the name already recorded for this file, tried first

    @property
    def path(self) -> Path:
        return self.base / (self.prefer or f"{self.day}/{self.rel}")

    def __str__(self) -> str:
        return str(self.path)

    def candidates(self, limit: int = 50) -> Iterator[str]:
        """Destination paths relative to base, most readable first: the inbox name, the name with the tag,
        numbered ones, then short hash-based names in the day folder (for names that cannot be created)."""
        rel = PurePosixPath(self.rel)
        if self.prefer:
            yield self.prefer
        yield f"{self.day}/{rel}"
        stem, suffix = rel.stem, rel.suffix
        for n in range(1, limit):
            name = f"{stem}-{self.tag[:8]}{suffix}" if n == 1 else f"{stem}-{self.tag[:8]}-{n}{suffix}"
            yield str(PurePosixPath(self.day) / rel.parent / name)
        yield from self.fallbacks(limit)

    def fallbacks(self, limit: int = 50) -> Iterator[str]:
        suffix = PurePosixPath(self.rel).suffix
        suffix = suffix if 1 < len(suffix) <= 12 and suffix.isascii() and suffix[1:].isalnum() else ""
        for n in range(limit):
            yield f"{self.day}/{self.tag[:16]}{'' if n == 0 else f'-{n}'}{suffix}"


# Errors about the destination name itself (too long, a file where a folder is needed, a folder of that name):
# another name works, so never pause intake or retry the same name for them.
NAME_ERRNOS = {errno.ENAMETOOLONG, errno.ENOTDIR, errno.EISDIR, errno.EEXIST, errno.ELOOP, errno.EINVAL}


@dataclass(frozen=True)
class Source:
    """An inbox entry to move or delete: root/rel, the (st_dev, st_ino) it had when it was read, its sha256."""

    root: Path
    rel: str
    ident: Ident | None = None
    sha256: str | None = None

    def __str__(self) -> str:
        return str(self.root / self.rel)


class OutputError(OSError):
    """The destination side failed (its folder vanished or cannot be made), not the inbox file."""


class Replaced(Exception):
    """The inbox name now holds another file (another inode, or other content) than the one screened."""


def _check_same(src: Source, fd: int, name: str) -> os.stat_result:
    s = os.stat(name, dir_fd=fd, follow_symlinks=False)
    if src.ident is not None and ident(s) != src.ident:
        raise Replaced(str(src))
    return s


def move_file(src: Source, dest: Dest, private: bool = False, share: Share | None = None) -> Path:
    """Move the inbox entry to the first destination name that is free and can be created; returns it.

    Never follows a symlink below the inbox or below dest.base, never replaces
    a file, never moves a hard-linked inode (see the module docstring).
    share (not with private): folders made here get its mode and group, and
    the stored file too when the agent owns it (share.py).
    Raises FileNotFoundError or Escaped (the entry left the inbox), Replaced
    (another file now has its name), or OSError (the output folder's fault).
    """
    with parent_fd(src.root, src.rel) as (sfd, sname):
        s = _check_same(src, sfd, sname)
        copy = st.S_ISREG(s.st_mode) and s.st_nlink > 1
        share = None if private else share
        mode = 0o700 if private else share.dir_mode if share is not None else 0o777
        on_create = share.fix_created_dir if share is not None else None
        try:
            if share is not None:
                share.make_dirs(dest.base)
            else:
                os.makedirs(dest.base, mode, exist_ok=True)
            bfd = os.open(dest.base, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as e:
            raise OutputError(e.errno, e.strerror, str(dest.base)) from None
        last: OSError | None = None
        try:
            for cand in dest.candidates():
                parts = PurePosixPath(cand).parts
                try:
                    dfd = walk_dirs(bfd, parts[:-1], create=True, mode=mode, on_create=on_create)
                except OSError as e:
                    if e.errno in NAME_ERRNOS:
                        last = e
                        continue
                    raise OutputError(e.errno, e.strerror, cand) from None
                try:
                    while True:
                        try:
                            if copy:
                                try:
                                    copy_noreplace(sfd, sname, dfd, parts[-1], src.sha256, private)
                                except ValueError:
                                    raise Replaced(str(src)) from None
                            else:
                                rename_noreplace(sfd, sname, dfd, parts[-1])
                            break
                        except OSError as e:
                            if e.errno == errno.EXDEV and not copy:
                                copy = True  # another file system: copy, fsync, then remove the inbox name
                                continue
                            raise
                    # No folder fsync for a rename: a rename lost in a power cut leaves the file in the inbox
                    # with its row 'pending', and the next start finishes the move (see commit.py).
                    if share is not None and share.gid is not None:
                        share.fix_at(dfd, parts[-1])
                    return dest.base / cand
                except OSError as e:
                    if isinstance(e, FileExistsError) and cand == dest.prefer and \
                            _already_there(sfd, sname, dfd, parts[-1], src.sha256):
                        os.unlink(sname, dir_fd=sfd)  # finished after a crash between the copy and the unlink
                        return dest.base / cand
                    if e.errno in NAME_ERRNOS:
                        last = e
                        continue
                    if isinstance(e, FileNotFoundError):
                        os.stat(sname, dir_fd=sfd, follow_symlinks=False)  # the inbox file is gone: raises
                        raise OutputError(e.errno, e.strerror, cand) from None
                    raise
                finally:
                    os.close(dfd)
        finally:
            os.close(bfd)
        assert last is not None
        raise last


def _already_there(sfd: int, sname: str, dfd: int, dname: str, sha256: str | None) -> bool:
    """Is the file at the recorded destination this very file (a crash came after it was linked or copied
    there and before the inbox name was removed)? Same inode, or a regular file with the screened content."""
    try:
        a = os.stat(sname, dir_fd=sfd, follow_symlinks=False)
        b = os.stat(dname, dir_fd=dfd, follow_symlinks=False)
    except OSError:
        return False
    if ident(a) == ident(b):
        return True
    if sha256 is None or not (st.S_ISREG(a.st_mode) and st.S_ISREG(b.st_mode)) or a.st_size != b.st_size:
        return False
    try:
        fd = os.open(dname, FILE_FLAGS, dir_fd=dfd)
    except OSError:
        return False
    h = hashlib.sha256()
    try:
        while chunk := os.read(fd, 1 << 20):
            h.update(chunk)
    finally:
        os.close(fd)
    return h.hexdigest() == sha256


def delete_file(src: Source) -> None:
    """Remove the inbox name (only that name: other hard links keep the content)."""
    with parent_fd(src.root, src.rel) as (fd, name):
        _check_same(src, fd, name)
        _unlink_inbox_name(name, fd)
