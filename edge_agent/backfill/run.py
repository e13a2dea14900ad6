"""The backfill on Ray Data: listing -> read tasks -> actor pool (Screener) -> partitioned Parquet.

    read_datasource(ListingDatasource)      byte ranges of the listing, streamed; inputs already written
                                            are skipped here, before any image is read
      .map_batches(Screener, concurrency=N) an actor pool: each actor loads and verifies the bundle once
      .write_datasink(publish.datasink)      Parquet per outcome, staged, published while this run
                                            owns the output folder (a resume claims it first)

Nothing here is a scheduler of our own: Ray Data streams the blocks, sizes the queues, retries failed tasks
and restarts dead actors. What is ours: the listing (inputs.py), the resume check (output.py), publishing
files so that a stopped run's workers cannot add rows behind a resume (publish.py), the progress line,
and making sure a local run of Ray fits the machine it is on.
"""
from __future__ import annotations

import logging
import os
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..config import Settings
from ..store import now_iso
from .inputs import Listing, byte_ranges, entry_location, is_uri, lines_in_range, manifest_summary, write_tree_listing
from .output import BackfillError, BackfillFailed, OutputDir, STATE_VERSION, Written
from .publish import claim, datasink, owner

log = logging.getLogger(__name__)

READ_CPUS = 0.0  # read and write tasks only move small blocks: they must never wait for a CPU the actors hold
WRITE_CPUS = 0.0


@dataclass
class Options:
    """How the backfill runs (the screening itself is configured by the agent's Settings)."""

    actors: int = 1
    actor_cpus: float = 1.0
    batch_rows: int = 16            # inputs per actor call (ONNX batches of settings.batch_size inside it)
    rows_per_file: int = 1000       # at least this many rows per Parquet file (fewer, bigger files)
    address: str | None = None      # an existing Ray cluster ("auto", "ray://host:10001"); None: a local one
    num_cpus: int | None = None     # a local cluster's CPUs (default: this machine's)
    object_store_mb: int | None = None
    dashboard: bool = False
    progress_seconds: float = 2.0


@dataclass
class Summary:
    entries: int
    already: int
    screened: int = 0
    quarantined: int = 0
    seconds: float = 0.0
    steady_rate: float | None = None
    written: Written | None = None
    notes: list[str] = field(default_factory=list)


# --- the listing as a Ray datasource ---------------------------------------------------------------

def _datasource(listing: Listing, location: str, done: np.ndarray, block_rows: int) -> Any:
    from ray.data import Datasource, ReadTask
    from ray.data.block import BlockMetadata

    class ListingDatasource(Datasource):  # type: ignore[misc]
        """The listing's byte ranges as read tasks; each yields blocks of (input_key, location)."""

        def get_name(self) -> str:
            return "BackfillListing"

        def estimate_inmemory_data_size(self) -> int | None:
            return None

        def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None,
                           data_context: Any = None) -> list[Any]:
            tasks = []
            for start, end in byte_ranges(_size(location, listing.path)):
                lo, hi = np.searchsorted(done, [start, end])
                skip = done[lo:hi].copy()
                meta = BlockMetadata(num_rows=None, size_bytes=end - start, exec_stats=None, input_files=None)
                tasks.append(ReadTask(_reader(listing, location, start, end, skip, block_rows), meta))
            return tasks

    return ListingDatasource()


def _size(location: str, path: str) -> int:
    from .inputs import output_fs

    fs, _ = output_fs(location)
    return int(fs.get_file_info(path).size or 0)


def _reader(listing: Listing, location: str, start: int, end: int, skip: np.ndarray,
            block_rows: int) -> Callable[[], Any]:
    def read() -> Any:
        import pyarrow as pa

        from .inputs import output_fs

        fs = output_fs(location)[0] if listing.kind == "tree" else _local_fs()
        keys: list[int] = []
        locs: list[str] = []
        for off, raw in lines_in_range(fs, listing.path, start, end):
            if len(skip) and skip[min(np.searchsorted(skip, off), len(skip) - 1)] == off:
                continue
            loc = entry_location(listing, raw)
            if loc is None:
                continue
            keys.append(off)
            locs.append(loc)
            if len(keys) >= block_rows:
                yield pa.table({"input_key": pa.array(keys, pa.int64()), "location": pa.array(locs, pa.string())})
                keys, locs = [], []
        if keys:
            yield pa.table({"input_key": pa.array(keys, pa.int64()), "location": pa.array(locs, pa.string())})
    return read


def _local_fs() -> Any:
    import pyarrow.fs as pafs

    return pafs.LocalFileSystem()


# --- progress ------------------------------------------------------------------------------------

def _progress_actor() -> Any:
    import ray

    @ray.remote(num_cpus=0)
    class Progress:
        """Counts what the actors finished; the driver polls it (fire-and-forget adds, no back-pressure)."""

        def __init__(self) -> None:
            self.results = 0
            self.quarantined = 0
            self.first: tuple[float, int] | None = None  # (when, how many) at the first finished batch
            self.last = 0.0

        def add(self, results: int, quarantined: int, at: float) -> None:
            """`at`: when the actor finished the batch (these calls may arrive late and in bursts)."""
            self.results += results
            self.quarantined += quarantined
            self.last = max(self.last, at)
            if self.first is None or at < self.first[0]:
                self.first = (at, results + quarantined)

        def get(self) -> tuple[int, int]:
            return self.results, self.quarantined

        def steady(self) -> float | None:
            """images/s from the first finished batch to the last: the rate without Ray's and the actors'
            start-up, which is what a long backfill runs at."""
            if self.first is None or self.last <= self.first[0]:
                return None
            return (self.results + self.quarantined - self.first[1]) / (self.last - self.first[0])

    return Progress.remote()


def progress_line(done: int, total: int, rate: float, elapsed: float) -> str:
    """done/total, images/s over this run, and the ETA at that rate."""
    left = max(total - done, 0)
    eta = left / rate if rate > 0 else float("nan")
    pct = 100.0 * done / total if total else 100.0
    eta_text = "--" if not np.isfinite(eta) else time.strftime("%H:%M:%S", time.gmtime(eta)) if eta < 86400 \
        else f"{eta / 86400:.1f} days"
    return f"backfill: {done}/{total} ({pct:.1f}%)  {rate:.1f} images/s  elapsed {elapsed:.0f} s  ETA {eta_text}"


# --- the run ------------------------------------------------------------------------------------

def prepare(source: str, output: str, settings: Settings, manifest: bool) -> tuple[OutputDir, Listing, dict[str, Any]]:
    """Verify the bundle, open or create the output folder's state and listing; refuse a resume whose
    arguments differ from the first run's."""
    from ..bundle import load_bundle
    from ..signing import trust_from_settings
    from ..triage import Policy

    bundle = load_bundle(settings.model_path, trust_from_settings(settings))
    from ..site_calibration import resolve as resolve_calibration  # the site's calibration, as the daemon applies it

    policy = Policy.from_bundle(bundle, settings.thresholds, settings.threshold_override,
                                resolve_calibration(settings.calibration, bundle))
    out = OutputDir(output)
    if manifest:
        if is_uri(source):
            raise BackfillError(f"--manifest {source}: the manifest must be a local file (its entries may be URIs); "
                                "copy it here first")
        src = Path(os.path.realpath(source))
        if not src.is_file():
            raise BackfillError(f"manifest {source} is not a readable file; pass a text file with one path or URI "
                                "per line")
        kind, root = "manifest", str(src.parent)
    else:
        src = Path(os.path.realpath(source))
        if not src.is_dir():
            raise BackfillError(f"{source} is not a folder; pass the archive's folder, or --manifest FILE with one "
                                "path or URI per line")
        kind, root = "tree", str(src)
    wanted = {"version": STATE_VERSION, "kind": kind, "source": str(src), "model_id": bundle.model_id,
              "manifest_sha256": bundle.manifest_sha256, "policy": policy.to_json(),
              "labels": list(bundle.labels)}
    state = out.read_state()
    if state is not None:
        for k, v in wanted.items():
            if state.get(k) != v:
                raise BackfillError(
                    f"{output} holds a backfill with {k} = {state.get(k)!r}, but this run has {v!r}; resume it with "
                    "the same source, bundle and thresholds, or use a new --output folder (merging both into one "
                    "database never duplicates an image)")
    if kind == "manifest":
        entries, digest = manifest_summary(src)
        if state is not None and state.get("listing_sha256") != digest:
            raise BackfillError(f"the manifest {src} changed since this backfill started (sha256 {digest}, was "
                                f"{state.get('listing_sha256')}); resuming would mix up inputs: restore it, or "
                                "use a new --output folder")
        listing = Listing("manifest", str(src), root, entries, digest)
    elif state is None:
        out.fs.create_dir(out.meta, recursive=True)
        log.info("listing %s (once; later runs use this listing)", src)
        entries, digest = write_tree_listing(src, out.fs, out.tree_listing)
        listing = Listing("tree", out.tree_listing, root, entries, digest)
    else:
        listing = Listing("tree", out.tree_listing, root, int(state["entries"]), str(state["listing_sha256"]))
    if state is None:
        state = {**wanted, "entries": listing.entries, "listing_sha256": listing.sha256, "started_at": now_iso()}
        out.write_state(state)
    return out, listing, state


def run_backfill(source: str, output: str, settings: Settings, manifest: bool = False,
                 opts: Options | None = None, echo: Callable[[str], None] | None = None) -> Summary:
    """Screen every input not yet written; returns the summary (the output folder then holds every input)."""
    opts = opts or Options()
    echo = echo or (lambda text: print(text, file=sys.stderr, flush=True))
    out, listing, state = prepare(source, output, settings, manifest)
    run_id = claim(out)  # from here on, no earlier run adds a file: what is written now stays what is written
    before = out.written()
    summary = Summary(entries=listing.entries, already=len(before.keys))
    if before.dropped:
        summary.notes.append(f"dropped {len(before.dropped)} Parquet file(s) cut off by the previous run's stop")
    if summary.already:
        echo(f"backfill: {summary.already} of {listing.entries} inputs already written in {output}; screening the "
             "rest")
    if summary.already >= listing.entries:
        summary.written = before
        return summary
    # Ray reports usage statistics to its vendor unless told not to: a hospital's backfill sends nothing
    # outside (an operator who wants it sets RAY_USAGE_STATS_ENABLED=1 explicitly).
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray

    started_here = False
    if not ray.is_initialized():
        init: dict[str, Any] = {"address": opts.address, "include_dashboard": opts.dashboard,
                                "log_to_driver": True, "configure_logging": False}
        if opts.address is None:
            init["num_cpus"] = opts.num_cpus or os.cpu_count() or 1
            if opts.object_store_mb:
                init["object_store_memory"] = int(opts.object_store_mb) << 20
        ray.init(**init)
        started_here = True
    try:
        summary = _execute(out, listing, state, settings, opts, summary, before.keys, run_id, echo)
    finally:
        if started_here:
            ray.shutdown()
    summary.written = out.written(drop_incomplete=False)
    return summary


def _still_owner(out: OutputDir, run_id: str) -> None:
    """Stop with the reason once another run has claimed the folder: from then on this run's files are
    never published (publish.py), so screening on would only burn CPU and end in a misleading 'incomplete'."""
    if owner(out) != run_id:
        raise BackfillFailed(
            f"another backfill took over {out.location} while this one ran (a second `edge-agent backfill` with "
            "the same output folder, or a resume started elsewhere); this run stopped and its files after that "
            "moment were not published, the other one carries on: let it finish, or run the same command again "
            "once it has stopped")


def _execute(out: OutputDir, listing: Listing, state: dict[str, Any], settings: Settings, opts: Options,
             summary: Summary, done: np.ndarray, run_id: str, echo: Callable[[str], None]) -> Summary:
    import ray
    from ray.data import DataContext

    from .screen import Screener

    ctx = DataContext.get_current()
    ctx.enable_progress_bars = False  # our own line below: done/total, images/s, ETA across runs
    progress = _progress_actor()
    ds = ray.data.read_datasource(_datasource(listing, out.location, done, opts.batch_rows), num_cpus=READ_CPUS)
    ds = ds.map_batches(Screener, batch_size=opts.batch_rows, batch_format="pyarrow",
                        compute=ray.data.ActorPoolStrategy(size=opts.actors), num_cpus=opts.actor_cpus,
                        fn_constructor_kwargs={"settings": settings, "expect_manifest": state["manifest_sha256"],
                                               "root": listing.root if listing.kind == "tree" else None,
                                               "progress": progress})
    t0 = time.monotonic()
    failure: list[BaseException] = []

    def write() -> None:
        try:
            ds.write_datasink(datasink(out.location if is_uri(out.location) else out.base, run_id,
                                       opts.rows_per_file), ray_remote_args={"num_cpus": WRITE_CPUS})
        except BaseException as e:  # re-raised in the caller's thread
            failure.append(e)

    writer = threading.Thread(target=write, name="backfill-write", daemon=True)
    writer.start()
    last = ""
    while writer.is_alive():
        writer.join(opts.progress_seconds)
        _still_owner(out, run_id)
        try:
            results, quarantined = ray.get(progress.get.remote(), timeout=10)
        except Exception:  # a busy cluster: skip one progress line, never the backfill
            continue
        elapsed = time.monotonic() - t0
        line = progress_line(summary.already + results + quarantined, summary.entries,
                             (results + quarantined) / elapsed if elapsed > 0 else 0.0, elapsed)
        if line != last:
            echo(line)
            last = line
    _still_owner(out, run_id)  # its last writes may have been refused after the loop's last look
    if failure:
        e = failure[0]
        if isinstance(e, (BackfillError, KeyboardInterrupt)):
            raise e
        text = " ".join(str(e).split())[:600]
        raise BackfillFailed(f"the Ray job failed ({type(e).__name__}: {text}); what was written is kept: run the "
                             "same command again to resume (Ray's logs: /tmp/ray/session_latest/logs)") from e
    summary.screened, summary.quarantined = ray.get(progress.get.remote())
    summary.steady_rate = ray.get(progress.steady.remote())
    summary.seconds = time.monotonic() - t0
    return summary
