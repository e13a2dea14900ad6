"""How the backfill's Parquet files reach the output folder: staged by their run, published only while that
run owns the folder.

Why: a SIGKILLed driver does not take its Ray workers with it at once. They sit in process groups of their
own and finish the task they are in - a write task then puts its file into `outcome=...` after the next run
has already read what is written, and those inputs are in the output twice (seen: 12 of 23 rows, in CI).
So each run first *claims* the folder (`claim`: a new owner id in `_backfill/run`, then it waits for any
publish under way); every write task writes its file under `_backfill/staging/<run>/` and moves it into
`outcome=<outcome>/` only if its run still owns the folder, holding a shared lock while it checks and moves.
A straggler of a stopped run finds another owner and deletes its file; its inputs were not counted as
written, so the new run screens them once.

The lock is `flock` on `_backfill/publish.lock`: local folders and NFS mounts. An object-store output has
no lock; there the claim waits PUBLISH_GRACE_S after naming the new owner, which covers a publish that
checked the owner just before (a move is one copy of a file of --rows-per-file rows), and the merge keeps
one row should a slower one still land (reported as "written twice").

File names are `part-<run>-<write task>.parquet`: a write task Ray retries within a run writes the same
names again, replacing its own files instead of adding rows.
"""
from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import posixpath
import time
import uuid
from collections.abc import Iterable, Iterator
from typing import Any

from .output import PARTITION, OutputDir

log = logging.getLogger(__name__)

PUBLISH_GRACE_S = 5.0


def _is_local(out: OutputDir) -> bool:
    import pyarrow.fs as pafs

    return isinstance(out.fs, pafs.LocalFileSystem)


def owner_path(out: OutputDir) -> str:
    return posixpath.join(out.meta, "run")


def staging_dir(out: OutputDir, run_id: str | None = None) -> str:
    base = posixpath.join(out.meta, "staging")
    return posixpath.join(base, run_id) if run_id else base


def owner(out: OutputDir) -> str | None:
    """The id of the run that owns the folder now (None: no run has claimed it)."""
    raw = out.read_meta(owner_path(out))
    return (raw.decode().strip() or None) if raw is not None else None


@contextlib.contextmanager
def publish_lock(out: OutputDir, exclusive: bool) -> Iterator[None]:
    """Shared while a write task checks the owner and moves its files; exclusive for a claim."""
    if not _is_local(out):
        yield
        return
    out.fs.create_dir(out.meta, recursive=True)
    fd = os.open(posixpath.join(out.meta, "publish.lock"), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        yield
    finally:
        os.close(fd)  # releases the lock


def claim(out: OutputDir) -> str:
    """Make a new run the folder's owner; when this returns, no earlier run can add a file any more."""
    run_id = uuid.uuid4().hex[:16]
    out.write_meta(owner_path(out), run_id.encode())
    with publish_lock(out, exclusive=True):
        pass  # a publish that checked the old owner has finished moving its files
    if not _is_local(out):
        time.sleep(PUBLISH_GRACE_S)  # no lock there: give such a publish time instead
    _delete_staging(out)
    return run_id


def _delete_staging(out: OutputDir) -> None:
    import pyarrow.fs as pafs

    d = staging_dir(out)
    if out.fs.get_file_info(d).type == pafs.FileType.Directory:
        n = sum(1 for i in out.fs.get_file_info(pafs.FileSelector(d, recursive=True)) if i.type == pafs.FileType.File)
        if n:
            log.info("deleting %d unpublished file(s) of stopped runs in %s (their inputs are screened again)", n, d)
        out.fs.delete_dir(d)


def _write_staged(out: OutputDir, path: str, table: Any) -> None:
    import pyarrow.parquet as pq

    if _is_local(out):  # durable before it is published: a power cut never leaves a published half file
        with open(path, "wb") as f:
            pq.write_table(table, f)
            f.flush()
            os.fsync(f.fileno())
    else:
        with out.fs.open_output_stream(path) as f:
            pq.write_table(table, f)


def write_and_publish(location: str, run_id: str, task_idx: int, tables: Iterable[Any]) -> int:
    """Write one write task's rows (Arrow tables with an `outcome` column) as one file per outcome, then
    publish them if `run_id` still owns the folder. Returns the rows published (0 for a stopped run)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    parts = [t for t in tables if t.num_rows]
    if not parts:
        return 0
    table = pa.concat_tables(parts, promote_options="default")
    out = OutputDir(location)
    stage = staging_dir(out, run_id)
    out.fs.create_dir(stage, recursive=True)
    name = f"part-{run_id}-{task_idx:06d}.parquet"
    staged: list[tuple[str, str, int]] = []
    for outcome in sorted(set(table.column(PARTITION).to_pylist())):
        rows = table.filter(pc.equal(table[PARTITION], outcome)).drop_columns([PARTITION])
        path = posixpath.join(stage, f"{outcome}-{name}")
        _write_staged(out, path, rows)
        staged.append((path, posixpath.join(out.base, f"{PARTITION}={outcome}", name), rows.num_rows))
    with publish_lock(out, exclusive=False):
        if owner(out) != run_id:
            for path, _, _ in staged:
                out.fs.delete_file(path)
            log.warning("backfill run %s no longer owns %s (a newer run resumed it): %d row(s) not published; "
                        "the newer run screens those inputs", run_id, location, sum(n for _, _, n in staged))
            return 0
        for path, final, _ in staged:
            out.fs.create_dir(posixpath.dirname(final), recursive=True)
            out.fs.move(path, final)
    return sum(n for _, _, n in staged)


def datasink(location: str, run_id: str, rows_per_file: int) -> Any:
    """A Ray Data Datasink writing through write_and_publish (Ray bundles at least rows_per_file rows per
    write task)."""
    from ray.data.block import BlockAccessor
    from ray.data.datasource import Datasink

    class FencedParquet(Datasink):  # type: ignore[misc]
        def __init__(self) -> None:
            self.location, self.run_id, self.rows = location, run_id, rows_per_file

        def get_name(self) -> str:
            return "BackfillParquet"

        @property
        def min_rows_per_write(self) -> int:
            return self.rows

        def write(self, blocks: Iterable[Any], ctx: Any) -> int:
            return write_and_publish(self.location, self.run_id, int(ctx.task_idx),
                                     (BlockAccessor.for_block(b).to_arrow() for b in blocks))

    return FencedParquet()
