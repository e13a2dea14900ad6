"""What one backfill actor does with a batch of inputs: the daemon's own functions, nothing re-implemented.

read (inputs.read_input: intake.read_file's rules for local files) -> decode in a memory-capped worker
process (decode_worker.DecodePool: the container checks, the pixel and file-size limits, the quality checks
and the preprocessing of decode.decode_image, and the crashed/stalled/over-memory decoder handling) ->
inference, FP32 spot-checks and triage (pipeline.screen_batch, the function the daemon's inference stage
calls) -> rows (pipeline.result_row's columns; quarantine rows with the agent's reason codes).

The actor loads and verifies the bundle once (signature and checksums, as `run` does), refuses a bundle
that is not the one the driver verified, and keeps its onnxruntime session and decoder process for its
whole life. A file never crashes the job: whatever it does ends as a quarantine row.
"""
from __future__ import annotations

import logging
import os
import resource
import time
from typing import Any

from ..benchstats import peak_rss_mb, proc_kb
from ..bundle import load_bundle
from ..config import Settings
from ..decode import QualityLimits
from ..decode_worker import DecodePool
from ..infer import Engine
from ..pipeline import limit_malloc_arenas, screen_batch
from ..rejection import Rejected
from ..signing import trust_from_settings
from ..store import now_iso
from ..triage import Policy
from .inputs import read_input
from .output import BackfillError, result_record, rows_to_table

log = logging.getLogger(__name__)


class Screener:
    """A Ray Data callable class (map_batches with an actor pool); usable without Ray too.

    settings: the agent's Settings (model, trust, thresholds, limits, batch_size, threads, providers,
    spot_check_fraction). expect_manifest: the sha256 of the manifest the driver verified. root: the
    archive root for a directory tree (None for a manifest: each file's own folder). progress: an optional
    Ray actor handle with add(results, quarantined).
    """

    def __init__(self, settings: Settings, expect_manifest: str, root: str | None, progress: Any = None) -> None:
        s = self.s = settings
        limit_malloc_arenas()
        self.bundle = load_bundle(s.model_path, trust_from_settings(s))
        if self.bundle.manifest_sha256 != expect_manifest:
            raise BackfillError(f"the bundle at {self.bundle.path} on this node (manifest {self.bundle.manifest_sha256}) "
                                f"is not the one the backfill started with ({expect_manifest}); install the same "
                                "bundle on every node")
        from ..site_calibration import resolve as resolve_calibration  # the site's calibration, as the daemon applies it

        self.policy = Policy.from_bundle(self.bundle, s.thresholds, s.threshold_override,
                                         resolve_calibration(s.calibration, self.bundle))
        self.policy_json = self.policy.to_json()
        self.labels = tuple(self.bundle.labels)
        self.root = root
        self.progress = progress
        self.max_bytes = int(s.max_file_mb * 2**20)
        limits = QualityLimits(s.min_sharpness, s.min_brightness, s.max_brightness, s.max_clipped_fraction)
        self.decoders = DecodePool(1, self.bundle.preprocessing, s.max_pixels, limits, self.max_bytes)
        self.decoders.start()  # its process imports OpenCV while the model loads
        self.engine = Engine(self.bundle, s.providers, s.threads)
        self.variant = self.engine.load()
        self.images = 0

    def __call__(self, batch: Any) -> Any:
        """pyarrow batch (input_key, location) -> pyarrow table of result/quarantine rows, one per input."""
        keys = batch.column("input_key").to_pylist()
        locations = batch.column("location").to_pylist()
        rows: list[dict[str, Any]] = []
        pending: list[tuple[dict[str, Any], Any, float]] = []
        for key, loc in zip(keys, locations, strict=True):
            t0 = time.monotonic()
            common = {"input_key": key, "original_path": loc, "original_name": _name(loc),
                      "received_at": now_iso(), "stored_path": None, "file_state": "kept"}
            got = read_input(loc, self.root, self.max_bytes)
            if got.problem is not None:
                rows.append(self._quarantine(common, got.sha256, got.size, *got.problem))
                continue
            assert got.data is not None and got.sha256 is not None
            try:
                decoded = self.decoders.decode(got.data, got.sha256, _name(loc))
            except Rejected as r:
                rows.append(self._quarantine(common, got.sha256, got.size, r.code, r.reason))
                continue
            pending.append(({**common, "sha256": got.sha256}, decoded, t0))
            if len(pending) >= self.s.batch_size:
                rows.extend(self._screen(pending))
                pending = []
        if pending:
            rows.extend(self._screen(pending))
        self.images += len(rows)
        if self.progress is not None:
            results = sum(r["outcome"] == "result" for r in rows)
            self.progress.add.remote(results, len(rows) - results, time.time())
        return rows_to_table(rows, self.labels)

    def _screen(self, pending: list[tuple[dict[str, Any], Any, float]]) -> list[dict[str, Any]]:
        rows = screen_batch(self.engine, self.bundle, self.policy, self.policy_json,
                            [(c["sha256"], d) for c, d, _ in pending], self.s.spot_check_fraction)
        done = time.monotonic()
        out = []
        for (common, _, t0), row in zip(pending, rows, strict=True):
            row["latency_ms"] = round((done - t0) * 1000, 1)
            out.append({**common, **result_record(row, self.labels), "outcome": "result"})
        return out

    @staticmethod
    def _quarantine(common: dict[str, Any], sha256: str | None, size: int | None, code: str,
                    reason: str) -> dict[str, Any]:
        return {**common, "outcome": "quarantine", "sha256": sha256, "size_bytes": size, "reason_code": code,
                "reason": reason, "quarantined_at": now_iso()}

    def usage(self) -> dict[str, Any]:
        """This actor's own figures (and its decoder process's peak memory), for the benchmark."""
        ru = resource.getrusage(resource.RUSAGE_SELF)
        pids = [w.info.get("pid") for w in self.decoders.workers if w.info.get("pid")]
        return {"pid": os.getpid(), "images": self.images, "cpu_s": ru.ru_utime + ru.ru_stime,
                "peak_rss_mb": peak_rss_mb(), "decoder_peak_rss_mb": [_hwm(p) for p in pids]}

    def __del__(self) -> None:
        decoders = getattr(self, "decoders", None)
        if decoders is not None:
            decoders.close()


def _name(location: str) -> str:
    return location.rstrip("/").rsplit("/", 1)[-1]


def _hwm(pid: int) -> float | None:
    kb = proc_kb("VmHWM:", pid)
    return kb / 1024 if kb else None
