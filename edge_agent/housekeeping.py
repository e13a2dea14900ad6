"""The daemon's periodic chores besides screening: retention (retention.py) and the metrics file (metrics.py).

Why a module of its own: the main loop stays a dispatcher; these chores run on their own clocks and must
never hold it up. Pruning touches the disk and the database, so it runs in a spare thread (at most one at
a time) with its own database connection and short transactions; the metrics file is cheap and is written
from the main loop.
"""
from __future__ import annotations

import logging
import threading
from typing import Any

from . import retention

log = logging.getLogger(__name__)

PAUSED_PRUNE_SECONDS = 60.0  # while intake is paused for disk space, apply the watermark this often


class Housekeeping:
    def __init__(self, agent: Any, now: float) -> None:
        s = agent.s
        self.agent = agent
        self.policy = retention.Policy(s.keep_processed_days, s.keep_quarantine_days, s.prune_free_mb)
        self.next_prune = now + min(30.0, s.prune_seconds)  # soon after start, not in the start-up rush
        self.next_metrics = now
        self._prune: threading.Thread | None = None

    def tick(self, now: float) -> None:
        a, s = self.agent, self.agent.s
        if self.policy.active and (now >= self.next_prune or (a.paused and self.policy.prune_free_mb and
                                                             now >= self.next_prune - s.prune_seconds
                                                             + PAUSED_PRUNE_SECONDS)):
            if self._prune is None or not self._prune.is_alive():
                self._prune = threading.Thread(target=self._run_prune, name="edge-agent-prune", daemon=True)
                self._prune.start()
            self.next_prune = now + s.prune_seconds
        if a.metrics is not None and now >= self.next_metrics:
            a.metrics.update(a)
            a.metrics.write()
            self.next_metrics = now + s.metrics_seconds

    def _run_prune(self) -> None:
        a = self.agent
        try:
            rep = retention.prune(a.db_path, a.processed, a.quarantine, self.policy)
        except Exception as e:  # never take screening down for housekeeping
            log.error("retention failed: %s: %s; screening continues, pruning is tried again in %g s",
                      type(e).__name__, e, a.s.prune_seconds)
            return
        if rep.removed or rep.missing:
            a._event("pruned", f"removed {rep.removed} stored file(s) ({rep.removed_bytes / 2**20:.1f} MiB) "
                               f"{rep.by_table}; {rep.missing} already gone; {len(rep.skipped)} left alone")

    def close(self) -> None:
        if self._prune is not None:
            self._prune.join()
        a = self.agent
        if a.metrics is not None:
            a.metrics.update(a, up=False)
            a.metrics.write()
