"""Serve image files to the browser without ever serving anything else.

A path in the database is data, not a permission: a row can name any path (an
old layout, a hand-edited database, a symlink planted in the processed folder
pointing at /etc/shadow). So a file is served only if
- its real path (every symlink resolved) lies inside the real processed or
  quarantine folder the app was started with;
- it is opened with O_NOFOLLOW (a symlink swapped in after the check is
  refused by the kernel, not followed) and fstat says it is a regular file;
- the opened file is the one checked (same device and inode as the path).
Quarantined files are never decoded here: the app shows what their header
says (decode.read_header / sniff: pure byte parsing of the first bytes), and the
browser never gets their content as an image.
"""
from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path

from ..decode import read_header, sniff
from ..rejection import Rejected
from ..store import fs_path

HEADER_BYTES = 1 << 20  # what read_header may look at: enough for any JPEG's SOF in practice
MIME = {"jpeg": "image/jpeg", "png": "image/png", "webp": "image/webp", "bmp": "image/bmp", "tiff": "image/tiff"}
BROWSER_FORMATS = ("jpeg", "png", "webp", "bmp")


class NotServable(Exception):
    """Why a file is not served; `status` is the HTTP status (404: not there, 403: outside the folders)."""

    def __init__(self, message: str, status: int = 404) -> None:
        super().__init__(message)
        self.status = status


def real(p: Path | str) -> Path:
    return Path(os.path.realpath(p))


def _inside(p: Path, roots: tuple[Path, ...]) -> bool:
    return any(p == r or p.is_relative_to(r) for r in roots)


@dataclass(frozen=True)
class OpenedFile:
    fd: int
    size: int
    path: Path


def open_inside(stored: str | None, roots: tuple[Path, ...]) -> OpenedFile:
    """Open a database-stored path for reading if, and only if, it is a regular file inside one of `roots`
    (real paths). NotServable otherwise, with words for the page."""
    path = fs_path(stored)
    if not path:
        raise NotServable("no stored copy of this image is recorded (deleted after screening, or kept in the inbox)")
    p = Path(path)
    if not p.is_absolute():
        raise NotServable("the stored path is not absolute; refusing to guess where it is", 403)
    try:
        target = real(p)
    except (OSError, ValueError):
        raise NotServable("the stored path cannot be resolved") from None
    if not _inside(target, roots):
        raise NotServable(f"the file is outside the processed and quarantine folders ({target.parent}); it is not "
                          "served", 403)
    try:
        fd = os.open(target, os.O_RDONLY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NONBLOCK", 0))
    except FileNotFoundError:
        raise NotServable(f"the image file {p.name} is missing: it was moved or pruned after screening (the result "
                          "and its probabilities remain)") from None
    except OSError as e:
        raise NotServable(f"the image file {p.name} cannot be opened ({e.strerror})", 403 if e.errno in
                          (40, 13, 1) else 404) from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise NotServable("not a regular file; it is not served", 403)
        lst = os.lstat(target)
        if (lst.st_dev, lst.st_ino) != (st.st_dev, st.st_ino):
            raise NotServable("the file changed while it was being opened; reload the page", 409)
        if not _inside(real(f"/proc/self/fd/{fd}") if os.path.exists(f"/proc/self/fd/{fd}") else target, roots):
            raise NotServable("the file is outside the processed and quarantine folders; it is not served", 403)
    except BaseException:
        os.close(fd)
        raise
    return OpenedFile(fd, st.st_size, target)


def read_all(f: OpenedFile, limit: int) -> bytes:
    """The file's bytes (at most `limit`; larger files are refused, not truncated)."""
    try:
        if f.size > limit:
            raise NotServable(f"the file is {f.size / 1e6:.0f} MB, larger than the {limit / 1e6:.0f} MB the review "
                              "app serves", 413)
        with os.fdopen(f.fd, "rb", closefd=True) as fh:
            return fh.read(limit + 1)[:limit]
    except BaseException:
        try:
            os.close(f.fd)
        except OSError:
            pass
        raise


def header_info(stored: str | None, roots: tuple[Path, ...]) -> dict[str, object]:
    """What a quarantined file's header says, without decoding it: size, format from its magic bytes, the
    dimensions the header declares (or why they cannot be read), and its first 64 bytes as hex."""
    f = open_inside(stored, roots)
    try:
        with os.fdopen(f.fd, "rb", closefd=True) as fh:
            head = fh.read(HEADER_BYTES)
    except OSError as e:
        raise NotServable(f"cannot read the file ({e.strerror})") from None
    info: dict[str, object] = {"size_bytes": f.size, "path": str(f.path), "format": sniff(head) or "unknown",
                               "first_bytes_hex": " ".join(f"{b:02x}" for b in head[:64]),
                               "first_bytes_text": "".join(chr(b) if 32 <= b < 127 else "." for b in head[:64])}
    try:
        h = read_header(head)
        info["declared"] = f"{h.format.upper()}, {h.width} x {h.height} pixels ({h.width * h.height / 1e6:.1f} MP)"
    except Rejected as r:
        info["declared"] = f"cannot be read from the header: {r.reason}"
    except Exception as e:  # noqa: BLE001 - a hostile header must give a line, never a traceback
        info["declared"] = f"cannot be read from the header ({type(e).__name__})"
    return info
