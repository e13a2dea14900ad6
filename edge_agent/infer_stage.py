"""Stage 3+4 of the pipeline: batched inference and triage, and the one place a model is switched.

Why here and not in the Agent: the model in use (bundle, engine, thresholds) is one immutable
`ActiveModel` that this stage's single thread reads once per batch. A new model (modelswap.py) is
offered, a SWAP marker wakes the thread, and the switch happens after the batch in hand and before the
next: every result row is produced by exactly one fully loaded model and carries that model's id, and
no image is dropped or screened twice by a switch.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .bundle import Bundle
from .commit import STOP, Job, Outcome, StageTimes
from .infer import Engine, InferenceError
from .triage import Policy

log = logging.getLogger(__name__)

SWAP = object()  # marker in the inference queue: apply the offered model now (between batches)


@dataclass(frozen=True)
class ActiveModel:
    """Everything a batch needs from the model, swapped as one reference."""

    bundle: Bundle
    engine: Engine
    policy: Policy
    policy_json: str
    source: str = "the model setting"


class InferStage:
    """The inference thread's loop, the model it uses and the pending switch."""

    def __init__(self, model: ActiveModel, batch_size: int, spot_check_fraction: float, q: queue.Queue[Any],
                 emit: Callable[[Any], None], timing: StageTimes, wake: Callable[[], None],
                 on_swap: Callable[[ActiveModel, ActiveModel], None] | None = None) -> None:
        self.model = model
        self.batch_size = batch_size
        self.fraction = spot_check_fraction
        self.q = q
        self.emit = emit
        self.timing = timing
        self.wake = wake
        self.on_swap = on_swap
        self.fatal: str | None = None
        self._offered: ActiveModel | None = None
        self._offer_lock = threading.Lock()
        self._reference_lock = threading.Lock()
        self.reference_wanted = False
        self._reference_loaders: list[threading.Thread] = []
        self._reference_for: Engine | None = None

    # --- model switch --------------------------------------------------------------------

    def offer(self, model: ActiveModel) -> None:
        """Hand a verified, loaded model to the inference thread; it switches before its next batch."""
        with self._offer_lock:
            self._offered = model
        self.q.put(SWAP)

    def _apply_offer(self) -> None:
        with self._offer_lock:
            new, self._offered = self._offered, None
        if new is None:
            return
        old, self.model = self.model, new
        log.info("model switched between batches: %s -> %s (%s, %s)", old.bundle.model_id, new.bundle.model_id,
                 new.engine.variant, new.source)
        self.load_reference_if_wanted()
        if self.on_swap is not None:
            self.on_swap(old, new)

    # --- spot-checks ------------------------------------------------------------------------

    def spot_selected(self, sha256: str) -> bool:
        """Deterministic by content, so a re-run (or the backfill) checks the same images."""
        from .pipeline import spot_selected

        return spot_selected(sha256, self.fraction)

    def want_reference(self) -> None:
        if not self.reference_wanted:
            self.reference_wanted = True
            self.load_reference_if_wanted()

    def load_reference_if_wanted(self) -> None:
        """A spot-check is coming: open the FP32 model in a spare thread while the image is still being
        decoded, instead of stalling the inference thread when it gets there (once the primary is loaded)."""
        engine = self.model.engine
        with self._reference_lock:
            if not self.reference_wanted or self._reference_for is engine or engine.variant is None:
                return
            self._reference_for = engine
            t = threading.Thread(target=engine.prepare_reference, daemon=True, name="edge-agent-spot-check-load")
            self._reference_loaders.append(t)
        t.start()

    def join_reference_loaders(self) -> None:
        """Never leave onnxruntime half-way through opening a model at exit."""
        for t in list(self._reference_loaders):
            t.join()

    # --- the loop ---------------------------------------------------------------------------

    def loop(self) -> None:
        bs = self.batch_size
        while True:
            job = self.q.get()
            if job is STOP:
                return
            if job is SWAP:
                self._apply_offer()
                continue
            batch, last, swap = [job], False, False
            while len(batch) < bs:
                try:
                    j = self.q.get_nowait()
                except queue.Empty:
                    break
                if j is STOP:
                    last = True
                    break
                if j is SWAP:
                    swap = True
                    break
                batch.append(j)
            t0 = time.perf_counter()
            try:
                self.run_batch(batch)
                self.timing.add("infer", time.perf_counter() - t0, len(batch))
                self.wake()  # room before the writer: dispatch more files now
            except InferenceError as e:
                self.fatal = str(e)
                self.wake()
                return
            if swap:
                self._apply_offer()
            if last:
                return

    def run_batch(self, batch: list[Job]) -> None:
        """Screen one batch with one model (read once: a swap never splits a batch): pipeline.screen_batch, the
        function the backfill's Ray actors call too, so the two can never screen differently."""
        from .pipeline import screen_batch

        m = self.model
        rows = screen_batch(m.engine, m.bundle, m.policy, m.policy_json,
                            [(j.sha256 or "", j.decoded) for j in batch], self.fraction)
        done = time.monotonic()
        for j, row in zip(batch, rows, strict=True):
            row["latency_ms"] = round((done - j.cand.dispatched) * 1000, 1)
            j.decoded = None
            self.emit(Outcome("result", j, row=row))
