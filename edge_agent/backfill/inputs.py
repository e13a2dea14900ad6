"""The archive's inputs: a listing made once, read back in byte ranges, and reading one input's bytes.

Why a listing file: an archive of millions of images must never be held in memory as a list of paths, and a
resumed run must name every input exactly as the first run did. A directory tree is therefore walked once,
streaming one entry per line into `<output>/_backfill/inputs.jsonl` (sorted per folder, so the walk is
deterministic); a manifest the operator gives is used as it is (its sha256 is recorded, and a changed
manifest refuses to resume). Each input is then keyed by the byte offset of its line in that listing: unique,
stable, and known to a read task without counting the lines before it, so read tasks can split the listing
into byte ranges and stream it in parallel.

Reading one input: a local path goes through the agent's own `intake.read_file` (no link followed out of the
folder, no device or pipe opened, the max_file_mb limit, the same quarantine codes and reasons); a URI
(s3://, gs://, abfs://, hdfs://, file://) through pyarrow's filesystems with the same size limit and the same
reason codes. The archive is only ever opened for reading.
"""
from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..intake import Vanished, name_kind, read_file

RANGE_BYTES = 256 * 1024  # listing bytes per read task: ~2,500 entries of 100 bytes
_BUF = 64 * 1024


def is_uri(text: str) -> bool:
    """scheme://... (one letter before ':' is a Windows drive, never a scheme)."""
    head, sep, _ = text.partition("://")
    return bool(sep) and len(head) > 1 and head.replace("+", "").replace("-", "").replace(".", "").isalnum()


def output_fs(location: str) -> tuple[Any, str]:
    """(pyarrow filesystem, path in it) for the output folder: a local path or an object-store URI."""
    import pyarrow.fs as pafs

    if is_uri(location):
        return pafs.FileSystem.from_uri(location)
    return pafs.LocalFileSystem(), os.path.abspath(location)


@dataclass(frozen=True)
class Listing:
    """Where the inputs are listed: `path` in `fs`; `kind` 'tree' (JSON string per line, relative to
    `root`) or 'manifest' (a path or URI per line, relative paths from the manifest's folder)."""

    kind: str
    path: str
    root: str
    entries: int
    sha256: str


# --- making the listing -----------------------------------------------------------------------

def walk_tree(root: Path) -> Iterator[str]:
    """Entries below `root` relative to it, depth first, sorted per folder, one folder in memory at a time.

    The agent's intake rules: hidden names (dotfiles, dot-folders) are skipped; a linked folder is an entry
    (it gets a quarantine row, as in the inbox); temp names (.part, ...) are entries (quarantined as abandoned
    uploads). Unlistable folders raise: a backfill that silently skipped a folder would not be complete.
    """
    stack = [""]
    while stack:
        rel_dir = stack.pop()
        here = root / rel_dir if rel_dir else root
        try:
            with os.scandir(here) as it:
                names = sorted((e.name, e.is_dir(follow_symlinks=False)) for e in it)
        except OSError as e:
            raise OSError(e.errno, f"cannot list {here} ({e.strerror}); give the backfill read access to the "
                                   "whole archive, or list the readable files in a manifest") from None
        subdirs = []
        for name, is_dir in names:
            if name.startswith("."):
                continue
            rel = f"{rel_dir}/{name}" if rel_dir else name
            if is_dir:
                subdirs.append(rel)
            else:
                yield rel
        stack.extend(reversed(subdirs))


def write_tree_listing(root: Path, fs: Any, path: str) -> tuple[int, str]:
    """Walk `root` into `path` (JSON string per line, written to a temporary name and renamed when
    complete); returns (entries, sha256 of the file)."""
    h = hashlib.sha256()
    n = 0
    tmp = path + ".tmp"
    with fs.open_output_stream(tmp) as f:
        buf: list[bytes] = []
        for rel in walk_tree(root):
            line = (json.dumps(rel) + "\n").encode("ascii")
            buf.append(line)
            n += 1
            if len(buf) >= 4096:
                chunk = b"".join(buf)
                f.write(chunk)
                h.update(chunk)
                buf.clear()
        chunk = b"".join(buf)
        f.write(chunk)
        h.update(chunk)
    fs.move(tmp, path)
    return n, h.hexdigest()


def manifest_summary(path: Path) -> tuple[int, str]:
    """(entries, sha256) of a manifest, streamed: blank lines and '#' comments are not entries."""
    h = hashlib.sha256()
    n = 0
    with open(path, "rb") as f:
        for line in f:
            h.update(line)
            s = line.strip()
            if s and not s.startswith(b"#"):
                n += 1
    return n, h.hexdigest()


# --- reading the listing back in byte ranges ----------------------------------------------------

def byte_ranges(size: int, step: int = RANGE_BYTES) -> list[tuple[int, int]]:
    return [(s, min(s + step, size)) for s in range(0, size, step)] or [(0, 0)]


def lines_in_range(fs: Any, path: str, start: int, end: int) -> Iterator[tuple[int, bytes]]:
    """(offset, line without newline) for every line that *starts* in [start, end): together the ranges of
    a file yield each line exactly once, whatever the split."""
    with fs.open_input_file(path) as f:
        pos = start
        if start > 0:  # the line that started before `start` belongs to the previous range
            f.seek(start - 1)
            pos = start - 1
            buf = b""
            while True:
                chunk = f.read(_BUF)
                if not chunk:
                    return
                buf += chunk
                nl = buf.find(b"\n")
                if nl >= 0:
                    pos += nl + 1
                    buf = buf[nl + 1:]
                    break
                pos += len(buf)
                buf = b""
        else:
            f.seek(0)
            buf = b""
        while pos < end:
            nl = buf.find(b"\n")
            while nl < 0:
                chunk = f.read(_BUF)
                if not chunk:
                    break
                buf += chunk
                nl = buf.find(b"\n")
            if nl < 0:
                if buf:
                    yield pos, buf
                return
            yield pos, buf[:nl]
            pos += nl + 1
            buf = buf[nl + 1:]


def entry_location(listing: Listing, raw: bytes) -> str | None:
    """The path or URI a listing line names, or None for a line that is not an entry."""
    if listing.kind == "tree":
        return os.path.join(listing.root, json.loads(raw))
    b = raw.strip()  # the same rule as manifest_summary, byte for byte (\r of a Windows manifest included)
    if not b or b.startswith(b"#"):
        return None
    text = b.decode("utf-8", "surrogateescape")
    if is_uri(text) or os.path.isabs(text):
        return text
    return os.path.join(listing.root, text)


# --- reading one input ---------------------------------------------------------------------

@dataclass
class Read:
    """One input's bytes and hash, or why it must be quarantined (the agent's codes)."""

    data: bytes | None
    sha256: str | None
    size: int | None
    problem: tuple[str, str] | None = None


def _temp_problem(name: str) -> tuple[str, str] | None:
    if name_kind(name) == "temp":
        return ("abandoned_partial", f"'{name}' has a temporary upload name in the archive: the transfer that "
                                     "wrote it was probably interrupted; find the complete image and screen it")
    return None


def read_input(location: str, root: str | None, max_bytes: int) -> Read:
    """Read and hash one input, never raising for the file's sake (the job must not crash on bad input).

    `root`: the folder local paths must stay below (the archive root for a tree; the file's own folder
    for a manifest entry), as the inbox is for the agent.
    """
    name = location.rstrip("/").rsplit("/", 1)[-1]
    if is_uri(location):
        return _read_uri(location, name, max_bytes)
    path = Path(os.path.abspath(location))
    base = Path(os.path.realpath(root if root is not None else path.parent))
    if root is None:
        path = base / path.name
    try:
        got = read_file(path, base, max_bytes)
    except Vanished:
        return Read(None, None, None, ("not_found", f"{location} is listed but does not exist (any more); check "
                                                    "the manifest or the archive"))
    if got.problem is None and (temp := _temp_problem(name)) is not None:
        return Read(None, got.sha256, got.size, temp)
    return Read(got.data, got.sha256, got.size, got.problem)


def _read_uri(uri: str, name: str, max_bytes: int) -> Read:
    import pyarrow.fs as pafs

    try:
        fs, path = pafs.FileSystem.from_uri(uri)
        info = fs.get_file_info(path)
        if info.type == pafs.FileType.NotFound:
            return Read(None, None, None, ("not_found", f"{uri} is listed but does not exist (any more); check the "
                                                        "manifest or the object store"))
        if info.type != pafs.FileType.File:
            return Read(None, None, None, ("not_regular", "not a regular file (a folder or something else); only "
                                                          "image files can be screened"))
        with fs.open_input_stream(path) as f:
            if info.size is not None and info.size > max_bytes:
                h = hashlib.sha256()
                while chunk := f.read(1 << 20):
                    h.update(chunk)
                return Read(None, h.hexdigest(), info.size, (
                    "too_large_file", f"file is {info.size / 2**20:.1f} MiB, above max_file_mb "
                                      f"{max_bytes / 2**20:g}; send a smaller export or raise max_file_mb"))
            data = f.read(max_bytes + 1)
    except (OSError, ValueError) as e:  # pyarrow raises OSError subclasses (and ArrowInvalid: ValueError)
        return Read(None, None, None, ("unreadable", f"reading {uri} failed ({e}); check the credentials and "
                                                     "the object store, then run the backfill again"))
    if len(data) > max_bytes:
        return Read(None, hashlib.sha256(data).hexdigest(), len(data), (
            "too_large_file", f"file is larger than max_file_mb {max_bytes / 2**20:g}; send a smaller export or "
                              "raise max_file_mb"))
    temp = _temp_problem(name)
    sha = hashlib.sha256(data).hexdigest()
    return Read(None if temp else data, sha, len(data), temp)

