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
import shutil
import time
from pathlib import Path
from typing import Any

from .atomicfile import write_atomic

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
        # drift (drift.py): the latest UTC day's figures and the alarms in force, refreshed once a minute
        self.drift_alarm = Gauge("edge_agent_drift_alarm", "1 while a drift alarm is in force (images unlike the "
                                 "training data, flag rate or class mix outside the bundle's range, ...), by kind",
                                 ["kind"], registry=r)
        self.day_images = Gauge("edge_agent_day_images", "Images screened on the latest UTC day", registry=r)
        self.day_share_ood = Gauge("edge_agent_day_share_out_of_distribution", "Share of the latest day's images "
                                   "flagged out_of_distribution", registry=r)
        self.day_mean_ood = Gauge("edge_agent_day_mean_ood_score", "Mean OOD score of the latest day's images "
                                  "(NaN without a format-3 bundle)", registry=r)
        self.day_flag_rate = Gauge("edge_agent_day_flag_rate", "Share of the latest day's images flagged by each "
                                   "high-risk rule", ["rule"], registry=r)
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
        drift = getattr(agent, "drift", None)
        if drift is not None:
            self._drift(drift)
        stage = getattr(agent, "stage", None)
        if stage is not None:
            b, engine = stage.model.bundle, stage.model.engine
            cal_id = getattr(stage.model.policy, "calibration_id", None)  # site calibration (site_calibration.py)
            self.model.info({"model_id": b.model_id, "variant": str(engine.variant or ""),
                             "primary": b.primary, "fallback_active": "1" if engine.is_fallback else "0",
                             "manifest_sha256": b.manifest_sha256, "temperature": f"{b.temperature:g}",
                             "calibration": str(cal_id) if cal_id else "bundle",
                             "ood_check": "on" if b.ood is not None else "off",
                             "source": str(stage.model.source)})

    def _drift(self, drift: Any) -> None:
        from .drift import ALARM_KINDS

        self._alarm_kinds = getattr(self, "_alarm_kinds", set(ALARM_KINDS)) | set(drift.active)
        for kind in self._alarm_kinds:  # a kind once seen stays in the file (0 when it clears)
            self.drift_alarm.labels(kind).set(1 if kind in drift.active else 0)
        d = drift.today
        if d is None:
            return
        self.day_images.set(d.images)
        self.day_share_ood.set(d.share(d.ood))
        self.day_mean_ood.set(float("nan") if d.mean_ood_score is None else d.mean_ood_score)
        for rule, n in (d.rule_flags or {}).items():
            self.day_flag_rate.labels(rule).set(d.share(n))

    # --- out ----------------------------------------------------------------------------------------

    def write(self) -> None:
        """Atomic rewrite in the library's text format; a failure is logged once per streak."""
        if self.path is None:
            return
        from prometheus_client import generate_latest

        self.written.set(time.time())
        try:
            write_atomic(self.path, generate_latest(self.registry), sync_folder=False)
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
