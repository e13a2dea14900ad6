"""Replace a small file whole or not at all: the metrics textfile, the active-model pointer, a calibration.

A temporary file in the same folder (so the rename cannot cross file systems), fsynced, renamed over
the old one, then the folder fsynced: a reader, or the agent after a power cut, sees the old file or the
new one, never half of one. The mode is set explicitly because the agent's umask is not the reader's
business: node_exporter runs as another user and must read the metrics file.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path


def write_atomic(path: Path, data: bytes, mode: int = 0o644, sync_folder: bool = True) -> None:
    """`sync_folder=False` for files rewritten every few seconds whose loss at a power cut costs nothing."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    if sync_folder:
        fsync_folder(path.parent)


def fsync_folder(folder: Path) -> None:
    """Make a rename in `folder` durable; file systems that cannot fsync a folder are left as they are."""
    try:
        dfd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(dfd)
    except OSError:
        pass
    finally:
        os.close(dfd)
