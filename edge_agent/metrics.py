"""Monitoring: a Prometheus textfile for node_exporter's textfile collector, and the same figures for `status`.

Why a textfile: the screening unit has no network service (PrivateNetwork=yes), so nothing may listen on a
port; node_exporter, run beside it, reads `*.prom` files from a folder and serves them. The file is
rewritten every metrics_seconds in prometheus_client's text format (generate_latest) as a temporary file
renamed over the old one, so node_exporter never reads half a file (0644: it runs as another user). prometheus_client is an
optional extra (`pip install 'edge-derm-screen[metrics]'`): without it the agent screens as always and says
once that metrics are off.

Counters count since the agent started (Prometheus handles the reset at a restart: use rate()/increase());
the database keeps the totals. `edge_agent_up` is 1 while the daemon runs and 0 in the file it leaves at a
clean stop, so a stale file after a crash is told apart by `edge_agent_last_write_timestamp_seconds`.
"""
from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

ENABLE = "pip install 'edge-derm-screen[metrics]' (prometheus_client) into the agent's environment"
FLAG_REASONS = ("high_risk", "low_confidence", "poor_quality", "model_disagreement", "out_of_distribution")
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)


class Metrics:
    """The agent's figures in a prometheus_client registry of its own (no process/platform collectors)."""

    def __init__(self, path: Path | None) -> None:
        import prometheus_client
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info

        if hasattr(prometheus_client, "disable_created_metrics"):  # no *_created series: noise in a textfile
            prometheus_client.disable_created_metrics()
        self.path = path
        r = self.registry = CollectorRegistry(auto_describe=True)
        self.screened = Counter("edge_agent_images_screened", "Images screened (a result recorded)", registry=r)
        self.flagged = Counter("edge_agent_images_flagged", "Screened images flagged for a clinician's review, "
                               "by reason (an image may have several)", ["reason"], registry=r)
        self.flagged_any = Counter("edge_agent_images_flagged_any", "Screened images flagged for review (any reason)",
                                   registry=r)
        self.quarantined = Counter("edge_agent_images_quarantined", "Files quarantined, by reason code", ["reason"],
                                   registry=r)
        self.duplicates = Counter("edge_agent_duplicates", "Files skipped as duplicates of a screened image",
                                  registry=r)
        self.fallbacks = Counter("edge_agent_fallback_results", "Results produced by the fallback model (INT8 to "
                                 "FP32 fallback)", registry=r)
        self.fallback_events = Counter("edge_agent_fallback_events", "Times the engine switched from the primary "
                                       "(INT8) to the fallback model (failed to load or to run)", registry=r)
        self.latency = Histogram("edge_agent_inference_latency_seconds", "Seconds from taking an image from the "
                                 "inbox to its result (decode, queue and inference)", buckets=LATENCY_BUCKETS,
                                 registry=r)
        self.backlog = Gauge("edge_agent_backlog", "Images waiting in the inbox or in flight", registry=r)
        self.last_result = Gauge("edge_agent_last_result_timestamp_seconds", "Unix time of the last result "
                                 "(0: none since start)", registry=r)
        self.disk_free = Gauge("edge_agent_disk_free_bytes", "Free bytes on the disk of each folder the agent "
                               "writes", ["folder"], registry=r)
        self.paused = Gauge("edge_agent_paused", "1 while intake is paused (disk full, database unwritable)",
                            registry=r)
        self.up = Gauge("edge_agent_up", "1 while the daemon runs; 0 in the file it leaves at a clean stop",
                        registry=r)
        self.ready = Gauge("edge_agent_ready", "1 once the model is loaded and the inbox watched", registry=r)
        self.written = Gauge("edge_agent_last_write_timestamp_seconds", "Unix time this file was written",
                             registry=r)
        self.model = Info("edge_agent_model", "The model in use: id, variant, manifest, calibration", registry=r)
        for reason in FLAG_REASONS:  # present at 0, so rate() and alerts work before the first flag
            self.flagged.labels(reason)
        self._warned = False

    # --- fed by the pipeline ------------------------------------------------------------------------

    def observe(self, o: Any) -> None:
        """One finished outcome (pipeline._finished, writer thread); prometheus_client is thread-safe."""
        if o.kind == "result":
            row = o.row
            self.screened.inc()
            if row.get("needs_review"):
                self.flagged_any.inc()
            for reason in filter(None, str(row.get("review_reasons") or "").split(",")):
                self.flagged.labels(reason).inc()
            if row.get("fallback"):
                self.fallbacks.inc()
            if isinstance(row.get("latency_ms"), (int, float)):
                self.latency.observe(row["latency_ms"] / 1000)
            self.last_result.set(time.time())
        elif o.kind == "duplicate":
            self.duplicates.inc()
        elif o.kind == "quarantine":
            self.quarantined.labels(o.code or "unknown").inc()

    def update(self, agent: Any, up: bool = True) -> None:
        """Gauges from the agent's state now (main thread)."""
        intake = getattr(agent, "intake", None)
        if intake is not None:
            self.backlog.set(intake.backlog + intake.inflight)
        self.paused.set(1 if (agent.paused or agent.db_error) else 0)
        self.up.set(1 if up else 0)
        self.ready.set(1 if up and agent.ready.is_set() else 0)
        for name, path in (("database", agent.db_path.parent), ("processed", agent.processed),
                           ("quarantine", agent.quarantine), ("inbox", agent.inbox)):
            try:
                self.disk_free.labels(name).set(shutil.disk_usage(path).free)
            except OSError:
                pass
        stage = getattr(agent, "stage", None)
        if stage is not None:
            b, engine = stage.model.bundle, stage.model.engine
            cal = b.manifest.get("calibration")
            self.model.info({"model_id": b.model_id, "variant": str(engine.variant or ""),
                             "primary": b.primary, "fallback_active": "1" if engine.is_fallback else "0",
                             "manifest_sha256": b.manifest_sha256, "temperature": f"{b.temperature:g}",
                             "calibration": str(cal.get("method", "")) if isinstance(cal, dict) else "temperature",
                             "source": str(stage.model.source)})

    # --- out ----------------------------------------------------------------------------------------

    def write(self) -> None:
        """Atomic rewrite in the library's text format; a failure is logged once per streak."""
        if self.path is None:
            return
        from prometheus_client import generate_latest

        self.written.set(time.time())
        try:
            write_atomic(self.path, generate_latest(self.registry))
            self._warned = False
        except OSError as e:
            if not self._warned:
                log.warning("cannot write the metrics file %s (%s); create its folder and make it writable by the "
                            "agent's user (ReadWritePaths= in the unit)", self.path, e.strerror or e)
                self._warned = True

    def snapshot(self) -> dict[str, float]:
        """Every sample as 'name{labels}': value - what `status --format json` shows as `metrics`."""
        out: dict[str, float] = {}
        for fam in self.registry.collect():
            for s in fam.samples:
                if s.name.endswith("_created"):
                    continue
                labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
                out[s.name + (f"{{{labels}}}" if labels else "")] = s.value
        return out


def write_atomic(path: Path, data: bytes) -> None:
    """Temporary file in the same folder, 0644 (node_exporter runs as another user and must read it whatever
    the agent's umask), fsynced, renamed over the old file: a reader sees the old file or the new one."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o644)
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


def make_metrics(path: Path | None) -> Metrics | None:
    """Metrics, or None (logged once, with how to turn them on) when prometheus_client is not installed."""
    try:
        return Metrics(path)
    except ImportError:
        if path is not None:
            log.warning("metrics are off: metrics_file is set to %s but prometheus_client is not installed; %s",
                        path, ENABLE)
        else:
            log.info("metrics (status figures, Prometheus textfile) are off: %s", ENABLE)
        return None
