"""The screening pipeline: intake -> hash/decode -> batched inference -> commit -> file moves.

Stages overlap instead of adding up: a small pool hashes, decodes and
preprocesses (OpenCV and hashlib release the GIL), one thread runs batches
through onnxruntime, and one thread owns the database (commit.py) and moves
files only after their outcome is durable. The main thread only decides
which files are ready (intake.py) and keeps systemd informed. At most
`queue_max` files are between intake and the writer (bytes being decoded,
tensors waiting for the model), which bounds memory however many arrive; up
to as many more may wait for their batched commit as rows; the rest wait in
the inbox as mere paths.

Stage modules: inference and triage, and the one place the model is switched, are infer_stage.py
(model swaps: modelswap.py); periodic chores (retention, the metrics file) are housekeeping.py.
"""
from __future__ import annotations

import json
import logging
import os
import queue
import shutil
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from . import fsafe
from .bundle import Bundle, BundleError, load_bundle
from .commit import STOP, STOP_RETRY_SECONDS, Claims, Committer, Job, Outcome, StageTimes
from .config import ConfigError, Settings
from .decode import QualityLimits, Rejected
from .drift import DriftMonitor
from .decode_worker import DecodePool, DecoderUnavailable
from .infer import Engine, InferenceError, check_providers
from .infer_stage import ActiveModel, InferStage
from .intake import Intake, Vanished, read_file
from .locks import Lock, lock_database, lock_inbox
from .paths import SitePaths, real as real_path, resolve as resolve_paths
from .notify import Notifier
from .poison import PoisonJournal
from .provenance import policy_event, startup_notices
from .share import resolve_share
from .signing import trust_from_settings
from .site_calibration import resolve as resolve_calibration
from .store import Reader, StoreError, Writer, damaged, describe_db_error, is_locked, now_iso
from .triage import Policy, softmax, triage

log = logging.getLogger(__name__)

TICK_SECONDS = 0.1
STATE_SECONDS = 5.0
DISK_SECONDS = 10.0
PAUSED_DISK_SECONDS = 2.0  # while paused (disk full, database unwritable), look again this often
INTAKE_LIMIT = 10_000  # paths held in memory at most; the rest wait in the inbox for the next rescan
MALLOC_ARENAS = 2
STATE_WAITING = 20  # files waiting (looked incomplete, temp names) posted for `status` at most


def limit_malloc_arenas(n: int = MALLOC_ARENAS) -> None:
    """Cap glibc's malloc arenas (M_ARENA_MAX) before the stage threads start.

    glibc gives each thread that allocates its own arena, up to 8 per core,
    and memory freed in one arena is not reused by the others: with the
    hash/decode workers, the inference and the writer thread each keeping
    their own high-water mark of image buffers, that is 20-30 MB of RSS for
    nothing on a small box. Two arenas cost no measurable speed here. A no-op
    where the C library is not glibc.
    """
    try:
        import ctypes

        libc = ctypes.CDLL(None)
        if hasattr(libc, "gnu_get_libc_version"):
            libc.mallopt(-8, int(n))  # M_ARENA_MAX
    except (OSError, AttributeError, TypeError):  # pragma: no cover - exotic platforms
        pass


@dataclass
class Counts:
    results: int = 0
    flagged: int = 0
    quarantined: int = 0
    duplicates: int = 0
    already_done: int = 0
    vanished: int = 0
    fallbacks: int = 0

    def total(self) -> int:
        return self.results + self.quarantined + self.duplicates + self.already_done + self.vanished


class Agent:
    """Runs the pipeline as a daemon (`run`) or once over the inbox (`scan`)."""

    def __init__(self, settings: Settings, notifier: Notifier | None = None, one_shot: bool = False,
                 on_outcome: Callable[[Outcome], None] | None = None,
                 reload_settings: Callable[[], Settings] | None = None) -> None:
        self.s = settings
        self.reload_settings = reload_settings  # SIGHUP re-reads the settings with it (modelswap.py)
        self.reload_requested = threading.Event()
        self.restart_reason: str | None = None  # a reload that needs a restart: `run` exits 4, systemd restarts
        self.swap_note: dict[str, str] = {}  # the last reload's outcome, for `status`
        self.model_source = "the model setting"
        self.state_due = False
        self.metrics: Any = None  # metrics.py, when metrics_file is set
        self.notifier = notifier or Notifier({})
        self.one_shot = one_shot
        self.on_outcome = on_outcome
        # Real paths everywhere (paths.py): the inbox, the outputs and the database compare and exclude by
        # where they really are, however they were spelled or linked.
        self.inbox = real_path(settings.inbox_dir)
        self._inbox_real = self.inbox
        self.processed = real_path(settings.processed_path)
        self.quarantine = real_path(settings.quarantine_path)
        self.db_path = real_path(settings.db_path)
        self._locks: list[Lock] = []
        self._pinned: Path | None = None  # the inbox pinned at start (fsafe.pin_root)
        self.counts = Counts()
        self.timing = StageTimes()  # busy seconds per stage (edge-agent bench)
        self.stopping = threading.Event()
        self.ready = threading.Event()  # set once the daemon watches the inbox (READY=1 for systemd)
        self._fatal: str | None = None
        self.paused: str | None = None
        self.wake: queue.SimpleQueue[tuple[str, str, str]] = queue.SimpleQueue()
        self.claims = Claims()
        self.prep_q: queue.Queue[Any] = queue.Queue()
        self.infer_q: queue.Queue[Any] = queue.Queue()
        self._threads: list[threading.Thread] = []
        self._infer_thread: threading.Thread | None = None
        self._writer_thread: threading.Thread | None = None
        self._counts_lock = threading.Lock()
        self.stage: InferStage | None = None
        self.housekeeping: Any = None  # housekeeping.py: pruning and the metrics file, from the main loop
        self.started_at = now_iso()
        # One line per image suits the journal; an interactive scan shows a progress bar instead.
        self._detail = logging.DEBUG if one_shot else logging.INFO
        self.committer: Committer | None = None
        self.decoders: DecodePool | None = None

    @property
    def fatal(self) -> str | None:
        """Why the agent must stop, if it must: files not yet committed stay in the inbox."""
        return self._fatal or (self.stage.fatal if self.stage else None) or (
            self.committer.fatal if self.committer else None)

    # The model in use: one ActiveModel, owned by the inference stage, swapped between batches (modelswap.py).
    @property
    def bundle(self) -> Bundle:
        if self.stage is None:
            raise AttributeError("bundle")
        return self.stage.model.bundle

    @property
    def engine(self) -> Engine:
        if self.stage is None:
            raise AttributeError("engine")
        return self.stage.model.engine

    @property
    def policy(self) -> Policy:
        if self.stage is None:
            raise AttributeError("policy")
        return self.stage.model.policy

    @property
    def policy_json(self) -> str:
        return self.policy.to_json()

    @property
    def db_error(self) -> str | None:
        return self.committer.db_error if self.committer else None

    # --- start-up ----------------------------------------------------------------

    def start(self) -> None:
        """Validate everything, open the database, start the stages and begin the initial scan.

        Expensive work is ordered so the first image is decoding while the
        model loads: both have to happen before the first result.
        """
        s = self.s
        site = resolve_paths(s)
        self.inbox = self._inbox_real = site.inbox
        self.processed, self.quarantine, self.db_path = site.processed, site.quarantine, site.db
        try:
            self._start(site)
        except BaseException:
            self._release_locks()
            raise

    def _start(self, site: SitePaths) -> None:
        s = self.s
        self.share = resolve_share(s.share_group)  # who may read results and images (share.py)
        try:
            self.share.make_dirs(site.db.parent)
        except OSError as e:
            raise ConfigError(f"cannot create the database folder {e.filename or site.db.parent} ({e.strerror}); "
                              "create it or choose another --db") from None
        # One agent per database and per inbox, decided before anything is read or written (locks.py).
        self._locks.append(lock_database(site.db))
        inbox_lock = lock_inbox(site.inbox)
        self._locks.append(inbox_lock)
        # The inbox folder itself is pinned: renamed, deleted or replaced by a link while we run, it is never
        # reopened by path (fsafe.open_root) and the loops stop the agent (_check_inbox).
        fsafe.pin_root(site.inbox, inbox_lock.fd)
        self._pinned = site.inbox
        limit_malloc_arenas()
        self._prepare_dirs()
        from .modelswap import initial_model

        model_path, expect_sha, self.model_source = initial_model(s, site.model)
        bundle = load_bundle(model_path, trust_from_settings(s))
        if expect_sha is not None and bundle.manifest_sha256 != expect_sha:
            raise BundleError(f"the activated bundle {model_path} changed after it was activated (manifest sha256 "
                              f"{bundle.manifest_sha256[:12]}, activated {expect_sha[:12]}): check the folder, then run "
                              "`edge-agent model activate` on it again or `edge-agent model rollback`")
        # The site calibration file (site_calibration.py), verified against this bundle before anything runs.
        calibration = resolve_calibration(s.calibration, bundle)
        policy = Policy.from_bundle(bundle, s.thresholds, s.threshold_override, calibration)
        self.drift = DriftMonitor(lambda: self.bundle.manifest)  # daily figures and drift alarms (drift.py)
        check_providers(s.providers)
        self.limits = QualityLimits(s.min_sharpness, s.min_brightness, s.max_brightness, s.max_clipped_fraction)
        self.store = Writer(site.db, bundle.labels, self.share)
        try:
            self._reconcile()
        except sqlite3.DatabaseError as e:
            self.store.close()
            raise StoreError(damaged(site.db, e)) from None
        # Before any decode: files that were being decoded when the last agent died get their strike.
        self.poison = PoisonJournal(site.db)
        self.poison.recover()
        self.decoders = DecodePool(s.workers, bundle.preprocessing, s.max_pixels, self.limits,
                                   int(s.max_file_mb * 2**20), journal=self.poison.journal,
                                   cpu_seconds=s.decode_cpu_seconds)
        try:
            self.decoders.start()  # the worker processes import OpenCV while the model loads
        except DecoderUnavailable as e:
            self.store.close()
            raise InferenceError(str(e)) from None
        self.reader = Reader(site.db)
        engine = Engine(bundle, s.providers, s.threads, on_event=self._event)
        self.stage = InferStage(ActiveModel(bundle, engine, policy, policy.to_json(), self.model_source),
                                s.batch_size, s.spot_check_fraction, self.infer_q, self._emit, self.timing,
                                lambda: self.wake.put(("wake", "", "")), on_swap=self._swapped)
        self.intake = Intake(site.inbox, [site.processed, site.quarantine], s.quiet_seconds,
                             s.partial_timeout_seconds, limit=max(INTAKE_LIMIT, 4 * s.queue_max))
        self.committer = Committer(s, self.store, self.intake, self.claims, self.processed, self.quarantine,
                                   on_finished=self._finished, on_commit=lambda: self.wake.put(("wake", "", "")),
                                   stopping=self.stopping)
        self.committer.timing = self.timing
        self.committer.share = self.share
        if self.one_shot:  # nobody waits for a one-shot scan to be unblocked: fail with the cause instead
            self.committer.give_up_after = STOP_RETRY_SECONDS
        self._writer_thread = self._spawn(self.committer.loop, "writer")
        self._check_disk()
        for i in range(s.workers):
            self._threads.append(self._spawn(self._prep_loop, f"prep-{i}"))
        self.initial_files = self.intake.scan(initial=True)
        self._dispatch()
        try:
            variant = self.engine.load()
        except Exception:
            self.shutdown()
            raise
        log.info("model %s loaded (%s%s) from %s", self.bundle.model_id, variant,
                 ", FALLBACK" if self.engine.is_fallback else "", self.bundle.path)
        self.stage.load_reference_if_wanted()
        self._infer_thread = self._spawn(self.stage.loop, "infer")
        self._event("start", f"{'scan' if self.one_shot else 'run'} pid={os.getpid()} model={self.bundle.model_id} "
                             f"variant={variant} source={self.model_source}")
        self._event("policy", policy_event(self.bundle, self.policy))
        if calibration is not None:
            log.info("site calibration %s", calibration.summary())
        for kind, message in startup_notices(self.bundle, self.policy, calibration):
            log.warning("%s", message)
            self._event(kind, message)
        self._post_state()
        self._emit(("call", self.drift.update))

    def _prepare_dirs(self) -> None:
        try:
            if not self.quarantine.exists():
                self.quarantine.mkdir(parents=True, mode=0o700)
            if self.s.after == "move":
                self.share.make_dirs(self.processed)
                if self.share.gid is not None:  # the group must reach the images: the folder is ours to open up
                    self.share.fix_path(self.processed, directory=True)
        except OSError as e:
            raise ConfigError(f"cannot create {e.filename} ({e.strerror}): create it or choose another "
                              "processed_dir/quarantine_dir") from None

    def _spawn(self, fn: Callable[[], None], name: str) -> threading.Thread:
        t = threading.Thread(target=self._guard(fn, name), name=f"edge-agent-{name}", daemon=True)
        t.start()
        return t

    def _guard(self, fn: Callable[[], None], name: str) -> Callable[[], None]:
        def run() -> None:
            try:
                fn()
            except BaseException as e:  # a dead stage must stop the agent, not leave it half-working
                log.exception("the %s thread failed", name)
                self._fatal = self._fatal or f"internal error in the {name} thread: {type(e).__name__}: {e}"
                self.wake.put(("wake", "", ""))
        return run

    def _reconcile(self) -> None:
        """Finish the bookkeeping of rows whose file was moved/deleted just before a crash.

        Rows whose file is still in the inbox are left alone: the scan finds
        the file, recognizes it by path and hash, and finishes the move.
        """
        fixed = 0
        with self.store.transaction():
            for r in self.store.pending():
                if os.path.lexists(r["original_path"]):
                    continue
                stored = r["stored_path"]
                state = "moved" if stored and os.path.lexists(stored) else "deleted" if not stored else "missing"
                if state == "missing":
                    log.warning("%s was recorded but is neither in the inbox nor at %s; marking it missing",
                                r["original_path"], stored)
                self.store.set_file_state(r["table"], r["id"], state)
                fixed += 1
        if fixed:
            log.info("finished the bookkeeping of %d file(s) moved before the last stop", fixed)

    # --- main loops ----------------------------------------------------------------

    def run(self, stop: threading.Event) -> int:
        """Daemon: process the inbox, then watch it until `stop` is set. Returns the exit code."""
        from .housekeeping import Housekeeping
        from .metrics import make_metrics
        from .watch import InboxWatcher, apply

        self.metrics = make_metrics(self.s.metrics_file)
        self.start()
        self.housekeeping = Housekeeping(self, time.monotonic())
        watcher = InboxWatcher(self.inbox)
        watcher.events = self.wake  # one queue wakes the loop, for file events and finished work alike
        try:
            watcher.start()
            self.intake.scan()  # catch files that arrived between the first scan and the watch
            self.notifier.ready(self._status_line())
            self.ready.set()
            log.info("watching %s (after=%s, processed=%s, quarantine=%s)", self.inbox, self.s.after,
                     self.processed, self.quarantine)
            now = time.monotonic()
            next_rescan, next_state, next_disk, next_ping = (now + self.s.rescan_seconds, now + STATE_SECONDS,
                                                            now + DISK_SECONDS, now)
            next_poll = now
            while not stop.is_set() and self.fatal is None and self.restart_reason is None:
                self._drain_wake(apply, TICK_SECONDS)
                now = time.monotonic()
                if self.reload_requested.is_set():
                    self.reload_requested.clear()
                    self._start_reload()
                if self.housekeeping is not None:
                    self.housekeeping.tick(now)
                if self.state_due:  # a model switch or reload outcome: show it in `status` now
                    self.state_due = False
                    self._post_state()
                if now >= next_rescan or (self.intake.overflowed and self.intake.backlog < self.intake.limit // 2):
                    self.intake.scan()
                    next_rescan = now + self.s.rescan_seconds
                if now >= next_disk:
                    self._check_disk()
                    gone = self.store.gone()  # noticed while idle too, not only at the next commit
                    if gone is not None and self._fatal is None:
                        self._fatal = gone
                    next_disk = now + (PAUSED_DISK_SECONDS if self.paused or self.db_error else DISK_SECONDS)
                if now >= next_poll:  # re-stats files still settling: costs O(files), so not at every wake
                    self._check_inbox()
                    self.intake.poll()
                    next_poll = now + TICK_SECONDS
                self._dispatch()
                if self.notifier.watchdog_interval and now >= next_ping and self.healthy():
                    self.notifier.watchdog()
                    next_ping = now + self.notifier.watchdog_interval
                if now >= next_state:
                    self._post_state()
                    if self.drift.due():
                        self._emit(("call", self.drift.update))
                    self.notifier.status(self._status_line())
                    next_state = now + STATE_SECONDS
                if not watcher.alive():
                    log.warning("the file watcher stopped; restarting it (rescans continue meanwhile)")
                    watcher.start()
        finally:
            self.notifier.stopping("finishing the batch in flight")
            log.info("stopping: finishing the images in flight")
            watcher.stop()
            self.shutdown()
        if self.fatal:
            log.error("%s", self.fatal)
            return 3
        log.info("stopped: %d screened, %d flagged, %d quarantined, %d duplicates", self.counts.results,
                 self.counts.flagged, self.counts.quarantined, self.counts.duplicates)
        if self.restart_reason is not None:
            log.warning("stopped to restart: %s (exit code 4; the systemd unit starts the agent again)",
                        self.restart_reason)
            return 4
        return 0

    def scan(self, progress: Callable[[int], None] | None = None, on_total: Callable[[int], None] | None = None,
             stop: threading.Event | None = None) -> int:
        """One pass over what is in the inbox now; returns the exit code (0: every file got an outcome)."""
        self.start()
        if self.paused:
            self.shutdown()
            self._fatal = f"not enough disk space to record results: {self.paused}"
            log.error("%s", self._fatal)
            return 3
        total = max(self.intake.outstanding(), self.initial_files)
        if on_total:
            on_total(total)
        reported = 0
        next_poll = 0.0
        try:
            while self._scan_pending() and self.fatal is None and not (stop and stop.is_set()):
                self._drain_wake(None, TICK_SECONDS)
                if self.intake.overflowed and self.intake.backlog < self.intake.limit // 2:
                    self.intake.scan(initial=True)  # more files than paths held: take the next share
                now = time.monotonic()
                if now >= next_poll:  # re-stats files still settling: costs O(files), so not at every wake
                    self._check_inbox()
                    self.intake.poll()
                    next_poll = now + TICK_SECONDS
                self._dispatch()
                done = self.counts.total()
                if progress and done > reported:
                    progress(done - reported)
                    reported = done
            # Stopped on request with files still to do: those dropped from the queue are no longer tracked,
            # so the count below would say "all done"; the exit code must say the scan is incomplete.
            interrupted = bool(stop and stop.is_set()) and self._scan_pending()
        finally:
            self.shutdown()
        if progress and self.counts.total() > reported:
            progress(self.counts.total() - reported)
        if self.fatal:
            log.error("%s", self.fatal)
            return 3
        if interrupted:
            log.warning("scan stopped on request; the files not screened yet stay in the inbox for the next scan")
            return 1
        return 0 if self.intake.outstanding() == 0 and not self.intake.overflowed and not self.intake.unlisted else 1

    def _scan_pending(self) -> bool:
        """Files still without an outcome that this scan can still give one; the cheap in-flight count first
        (outstanding() walks every file). Files that look incomplete and changed less than partial_timeout ago
        are not waited for: they stay in the inbox and `left_in_inbox` names them."""
        return self.intake.inflight > 0 or self.intake.overflowed or \
            self.intake.outstanding() > self.intake.deferred()

    def left_in_inbox(self) -> list[tuple[str, str, float]]:
        """(file, why, seconds since it last changed) for files this pass left in the inbox on purpose."""
        return self.intake.waiting() if hasattr(self, "intake") else []

    def _drain_wake(self, apply: Callable[..., None] | None, timeout: float) -> None:
        try:
            ev = self.wake.get(timeout=timeout)
        except queue.Empty:
            return
        while True:
            if ev[0] != "wake" and apply is not None:
                apply(ev, self.intake)
            try:
                ev = self.wake.get_nowait()
            except queue.Empty:
                return

    def _dispatch(self) -> None:
        if self.paused or self.db_error or self.stopping.is_set() or self.fatal:
            return
        # queue_max bounds the files before the writer (bytes being decoded, tensors waiting for the model).
        # Files whose outcome only waits for the next batched commit hold a row, not pixels: they must not
        # stall decoding, or every commit would drain the pipeline. All in flight stay under 2 x queue_max.
        inflight = self.intake.inflight
        held = self.committer.held if self.committer is not None else 0
        room = min(self.s.queue_max - (inflight - held), 2 * self.s.queue_max - inflight)
        if room > 0:
            for cand in self.intake.take(room):
                self.prep_q.put(Job(cand))

    def healthy(self) -> bool:
        """All stages alive and the writer loop turning: what the systemd watchdog vouches for."""
        threads = [*self._threads, self._writer_thread] + ([self._infer_thread] if self._infer_thread else [])
        return (self.fatal is None and all(t is not None and t.is_alive() for t in threads)
                and self.committer is not None and time.monotonic() - self.committer.tick < 60)

    def shutdown(self) -> None:
        """Stop taking files, let the stages finish what they hold, commit, close."""
        if self.stopping.is_set():
            return
        self.stopping.set()
        for _ in self._threads:
            self.prep_q.put(STOP)
        for t in self._threads:
            t.join()
        if self.decoders is not None:
            self.decoders.close()
        if self._infer_thread is not None:
            self.infer_q.put(STOP)
            self._infer_thread.join()
        if self.stage is not None:
            self.stage.join_reference_loaders()
        if self.housekeeping is not None:
            self.housekeeping.close()
        if self._writer_thread is not None:
            if hasattr(self, "drift"):
                self._emit(("call", self.drift.update))  # the day's figures include this run's last results
            self._post_state(stopped=True)
            self._emit(STOP)
            self._writer_thread.join()
        if hasattr(self, "store"):
            self.store.close()
        self._release_locks()

    def _check_inbox(self) -> None:
        """Stop (exit 3, files stay) when the inbox folder is no longer the one the agent started with."""
        what = fsafe.root_change(self.inbox)
        if what is not None and self._fatal is None:
            self._fatal = inbox_moved(self.inbox, what)

    def _release_locks(self) -> None:
        if self._pinned is not None:
            fsafe.unpin_root(self._pinned)
            self._pinned = None
        while self._locks:
            self._locks.pop().release()

    # --- housekeeping --------------------------------------------------------------------

    def _event(self, kind: str, detail: str) -> None:
        if kind == "fallback" and self.metrics is not None:
            self.metrics.fallback_events.inc()
        self._emit(("event", kind, detail))

    def _post_state(self, stopped: bool = False) -> None:
        engine = getattr(self, "engine", None)
        self._emit(("state", {
            "pid": os.getpid(), "mode": "scan" if self.one_shot else "run", "started_at": self.started_at,
            "heartbeat": now_iso(), "stopped_at": now_iso() if stopped else "",
            "model_id": self.bundle.model_id, "model_path": str(self.bundle.path),
            "model_variant": engine.variant if engine else "", "model_primary": self.bundle.primary,
            "model_fallback_active": int(bool(engine and engine.is_fallback)),
            "calibration_id": self.policy.calibration_id or "",
            "inbox": str(self.inbox), "processed_dir": str(self.processed), "quarantine_dir": str(self.quarantine),
            "backlog": self.intake.backlog + self.intake.inflight, "paused": self.paused or self.db_error or "",
            "min_free_mb": self.s.min_free_mb, "quiet_seconds": self.s.quiet_seconds,
            "partial_timeout_seconds": self.s.partial_timeout_seconds,
            # what `edge-agent status` cannot see from outside: which files wait because they looked incomplete
            "waiting": json.dumps([{"file": rel, "why": why, "since": round(age)}
                                   for rel, why, age in self.intake.waiting()[:STATE_WAITING]]),
            "model_source": self.model_source, "model_manifest_sha256": self.bundle.manifest_sha256,
            "model_swap": json.dumps(self.swap_note) if self.swap_note else "",
            # the monitoring figures (metrics.py), so that `status --format json` carries what the textfile does
            "metrics": json.dumps(self.metrics.snapshot()) if self.metrics is not None else "",
        }))

    def status_line(self) -> str:
        """One line on how the agent is doing (SIGUSR1); "starting" before the model is loaded."""
        try:
            return self._status_line()
        except Exception:  # called from a signal handler at any moment: never fail there
            return "starting"

    def _status_line(self) -> str:
        c = self.counts
        return (f"screened {c.results}, flagged {c.flagged}, quarantined {c.quarantined}, duplicates {c.duplicates}, "
                f"backlog {self.intake.backlog}" + (f", PAUSED: {self.paused}" if self.paused else ""))

    def _check_disk(self) -> None:
        """Pause intake while a disk we write to is nearly full, rather than fail mid-batch."""
        need = self.s.min_free_mb * 1024 * 1024
        low = []
        for path in {self.db_path.parent, self.quarantine, *([self.processed] if self.s.after == "move" else [])}:
            try:
                free = shutil.disk_usage(path).free
            except OSError:
                continue
            if free < need:
                low.append(f"{path} has {free / 2**20:.0f} MiB free (< min_free_mb {self.s.min_free_mb:.0f})")
        reason = "; ".join(low) or None
        if reason and not self.paused:
            log.warning("pausing intake: %s; free some space, the agent resumes by itself", reason)
            self._event("paused", reason)
        elif self.paused and not reason:
            log.info("disk space recovered; resuming intake")
            self._event("resumed", "")
        if reason != self.paused:
            self.paused = reason
            self._post_state()

    # --- stage 1+2: read, hash, decode ---------------------------------------------------

    def _prep_loop(self) -> None:
        while True:
            job = self.prep_q.get()
            if job is STOP:
                self.reader.close()  # this thread's read connection; lets the writer's close drop the WAL
                return
            if self.stopping.is_set():
                self.intake.done(job.cand.rel)  # not started: it stays in the inbox for next time
                continue
            try:
                self._prepare(job)
            except Exception as e:
                if _database_fault(e):  # never quarantine an image for the database's fault
                    self._db_fault(job, e)
                    continue
                log.exception("unexpected error while checking %s", job.cand.path)
                self._emit(Outcome("quarantine", job, code="internal_error",
                                   reason=f"the agent failed while checking this file ({type(e).__name__}: {e}); "
                                          "please report this with the file; move it back into the inbox to retry"))

    def _db_fault(self, job: Job, e: BaseException) -> None:
        """A lookup in the database failed: the database's fault, never the image's. The file stays in the
        inbox without an outcome; a lock is waited out (the next rescan takes the file again), anything else
        (deleted, damaged) stops intake with the cause."""
        if job.claimed and job.sha256:
            job.claimed = False
            for twin in self.claims.release(job.sha256):
                self.intake.done(twin.cand.rel)
        self.intake.done(job.cand.rel)
        if isinstance(e, sqlite3.Error) and is_locked(e):
            log.warning("%s; %s stays in the inbox for the next pass", describe_db_error(self.db_path, e), job.cand.rel)
            return
        problem = (self.store.gone() if hasattr(self, "store") else None) or (
            str(e) if isinstance(e, StoreError) else damaged(self.db_path, e))
        if self._fatal is None:
            self._fatal = problem
            log.error("%s", problem)
        self.wake.put(("wake", "", ""))

    def _emit(self, item: Any) -> None:
        assert self.committer is not None
        self.committer.put(item)

    def _prepare(self, job: Job) -> None:
        c = job.cand
        t0 = time.perf_counter()
        try:
            got = read_file(c.path, self._inbox_real, int(self.s.max_file_mb * 2**20))
        except Vanished:
            self._emit(Outcome("vanished", job))
            return
        self.timing.add("hash", time.perf_counter() - t0)
        job.sha256, job.size, data, job.ident = got.sha256, got.size, got.data, got.ident
        # This very file (same path, same content) may already have a committed outcome: a crash came
        # before its move, or after=keep left it here. Then only the move is owed, not a second row.
        rec = self.reader.recorded(str(c.path), job.sha256, ("pending", "kept"))
        if rec is not None:
            kind = "skip" if rec["file_state"] == "kept" and self.s.after == "keep" else "finish"
            self._emit(Outcome(kind, job, existing=rec))
            return
        if got.problem is not None:
            self._emit(Outcome("quarantine", job, code=got.problem[0], reason=got.problem[1]))
            return
        assert data is not None and job.sha256 is not None
        if c.abandoned:
            self._emit(Outcome("quarantine", job, code="abandoned_partial", reason=(
                f"'{Path(c.rel).name}' has a temporary upload name and did not change for "
                f"{self.s.partial_timeout_seconds:g} s without being renamed: the transfer was probably interrupted; "
                "send the image again")))
            return
        if not self.claims.claim(job.sha256, job):
            return  # an identical file is in flight; this one becomes its duplicate once that is committed
        job.claimed = True
        rid = self.reader.result_id(job.sha256)
        if rid is not None:
            self._emit(Outcome("duplicate", job, result_id=rid))
            return
        assert self.stage is not None
        if not self.stage.reference_wanted and self.stage.spot_selected(job.sha256):
            self.stage.want_reference()
        suspect = self.poison.condemned(job.sha256)
        if suspect is not None:
            self._emit(Outcome("quarantine", job, code="crashed_decoder", reason=(
                f"the agent died while decoding this file, {suspect['strikes']} times in a row: it is probably "
                "crafted to exhaust memory or crash the decoder, so it was not decoded again - re-export the image; "
                "move it back into the inbox to retry")))
            self.poison.cleared(job.sha256)
            return
        t0 = time.perf_counter()
        try:
            assert self.decoders is not None
            job.decoded = self.decoders.decode(data, job.sha256, c.rel)
        except DecoderUnavailable as e:
            self._fatal = self._fatal or str(e)  # nothing can be screened safely: stop; the files stay in the inbox
            self.wake.put(("wake", "", ""))
            return
        except Rejected as r:
            self.poison.cleared(job.sha256)
            self.timing.add("decode", time.perf_counter() - t0)
            if c.provisional:  # taken early at start-up: maybe it is still being written
                self._emit(Outcome("recheck", job, code=r.code, reason=r.reason))
            elif r.maybe_incomplete and not c.final:
                # `run` and `scan` alike: an empty or truncated file may still be being copied. It is quarantined
                # only once unchanged for partial_timeout (judged from its own timestamps when found at start,
                # so an old one goes at once); a scan does not wait that long, it leaves it and names it.
                self._emit(Outcome("defer", job, code=r.code, reason=r.reason))
            else:
                reason = r.reason
                if r.maybe_incomplete and c.final:
                    reason += f" (unchanged for {self.s.partial_timeout_seconds:g} s)"
                self._emit(Outcome("quarantine", job, code=r.code, reason=reason))
            return
        self.poison.cleared(job.sha256)
        self.timing.add("decode", time.perf_counter() - t0)
        del data
        self.infer_q.put(job)

    # --- stage 3+4: inference and triage: infer_stage.py; model swaps: modelswap.py -------------------

    def request_reload(self) -> None:
        """SIGHUP / `systemctl reload`: re-read the settings and the active model, verify, switch (modelswap.py).
        Safe from a signal handler: it only sets a flag the main loop acts on."""
        self.reload_requested.set()
        self.wake.put(("wake", "", ""))

    def _start_reload(self) -> None:
        from .modelswap import start_reload

        start_reload(self)

    def _swapped(self, old: ActiveModel, new: ActiveModel) -> None:
        from .modelswap import swapped

        swapped(self, old, new)

    def _finished(self, o: Outcome) -> None:
        c = o.job.cand
        kind = o.kind
        if kind == "defer":
            log.info("%s looks incomplete (%s); waiting for the rest of it (quarantined once unchanged for %g s)",
                     c.rel, o.code, self.s.partial_timeout_seconds)
            self.intake.done(c.rel, defer=True, note=o.code)
            return
        if kind == "recheck":
            log.debug("%s changed just before start-up and failed its checks (%s); looking again once it is "
                      "quiet", c.rel, o.code)
            self.intake.done(c.rel, recheck=True)
            return
        self.intake.done(c.rel, settle=o.settle)
        if self.metrics is not None:
            self.metrics.observe(o)
        with self._counts_lock:
            if kind == "result":
                self.counts.results += 1
                self.counts.flagged += o.row.get("needs_review", 0)
                self.counts.fallbacks += o.row.get("fallback", 0)
                log.log(self._detail, "result %s: %s %.2f%s (%s, %s ms)", c.rel, o.row["label"],
                        o.row["confidence"], f" REVIEW: {o.row['review_reasons']}" if o.row["review_reasons"] else "",
                        o.row["model_variant"], o.row["latency_ms"])
            elif kind == "duplicate":
                self.counts.duplicates += 1
                log.log(self._detail, "duplicate %s: same image as result #%s", c.rel, o.result_id)
            elif kind == "quarantine":
                self.counts.quarantined += 1
                log.warning("quarantined %s (%s): %s", c.rel, o.code, o.reason)
            elif kind in ("finish", "skip"):
                self.counts.already_done += 1
                log.log(self._detail, "%s was already recorded (%s #%s); %s", c.rel, o.table, o.row_id,
                        "finished moving it" if kind == "finish" else "kept it")
            elif kind == "vanished":
                self.counts.vanished += 1
                log.info("%s disappeared from the inbox before it could be read", c.rel)
        if self.on_outcome is not None:
            self.on_outcome(o)




def inbox_moved(inbox: Path, what: str) -> str:
    return (f"the inbox {inbox} was {what} while the agent was screening it: screening stopped so that no file "
            "outside the inbox is read, recorded or moved (files not screened yet stay where they are, nothing was "
            f"deleted); put the inbox folder back at {inbox} or fix the inbox setting, then start the agent again")


def _database_fault(e: BaseException) -> bool:
    """The database failed (cannot be opened, locked, damaged, deleted), as opposed to a bug in a query."""
    return isinstance(e, StoreError) or (isinstance(e, sqlite3.DatabaseError) and not isinstance(
        e, (sqlite3.IntegrityError, sqlite3.ProgrammingError, sqlite3.InterfaceError)))


def spot_selected(sha256: str, fraction: float) -> bool:
    """Whether this image gets the FP32 spot-check: deterministic by content, so a re-run (or the backfill,
    edge_agent/backfill) checks the same images."""
    return fraction > 0 and int(sha256[:8], 16) / 0xFFFFFFFF < fraction


def screen_batch(engine: Engine, bundle: Bundle, policy: Policy, policy_json: str,
                 items: list[tuple[str | None, Any]], spot_check_fraction: float) -> list[dict[str, Any]]:
    """Inference, spot-checks and triage of decoded images: one `results` row per (sha256, Decoded), in order
    (latency_ms 0.0: the caller knows when the image entered). The daemon's inference stage and the backfill's
    Ray actors (edge_agent/backfill) both call this, so the two can never screen differently."""
    x = np.stack([d.tensor for _, d in items]).astype(np.float32, copy=False)
    b = bundle
    logits, pooled, variant = engine.infer_features(x, pooled=b.ood is not None)
    probs = softmax(logits, policy.temperature)  # the site calibration's temperature when one is in force
    ood = b.ood.score(pooled, variant) if b.ood is not None and pooled is not None else None
    ref: dict[int, np.ndarray] = {}
    if engine.can_spot_check:
        idx = [i for i, (sha, _) in enumerate(items) if sha and spot_selected(sha, spot_check_fraction)]
        if idx:
            r = engine.reference(x[idx])
            if r is not None:
                ref = dict(zip(idx, softmax(r, policy.temperature), strict=True))
    processed_at = now_iso()
    fallback = variant != b.primary
    rows = []
    for i, (sha, d) in enumerate(items):
        spot_label, disagree = None, False
        if i in ref:
            mine, theirs = triage(probs[i], policy), triage(ref[i], policy)
            spot_label = theirs.label
            disagree = theirs.label != mine.label or bool(theirs.rules_hit) != bool(mine.rules_hit)
        t = triage(probs[i], policy, poor_quality=d.quality.poor, disagreement=disagree,
                   out_of_distribution=ood is not None and bool(b.ood.flags(ood[i], variant)))
        rows.append(result_row(t, d, sha256=sha, processed_at=processed_at, model_id=b.model_id, variant=variant,
                               ood_score=None if ood is None else round(float(ood[i]), 4),
                               fallback=fallback, label_name=b.label_names.get(t.label, t.label),
                               manifest_sha256=b.manifest_sha256, policy=policy_json, spot_checked=i in ref,
                               calibration_id=policy.calibration_id,
                               spot_label=spot_label, latency_ms=0.0))
    return rows


def result_row(t: Any, d: Any, *, sha256: str, processed_at: str, model_id: str, variant: str, fallback: bool,
               label_name: str, spot_checked: bool, spot_label: str | None, latency_ms: float,
               manifest_sha256: str, policy: str, ood_score: float | None = None,
               calibration_id: str | None = None) -> dict[str, Any]:
    """The `results` columns of one screened image (triage `t`, decoded image `d`), shared with the benchmark.
    manifest_sha256, policy (Policy.to_json) and calibration_id (the site calibration file in force, None for
    the bundle's own thresholds) record what the result was produced under (provenance.py)."""
    return {
        "sha256": sha256, "processed_at": processed_at, "model_id": model_id, "model_variant": variant,
        "manifest_sha256": manifest_sha256, "policy": policy, "calibration_id": calibration_id,
        "fallback": int(fallback), "label": t.label, "label_name": label_name,
        "confidence": round(t.confidence, 6), "p_high_risk": round(t.p_high_risk, 6),
        "probabilities": {k: round(v, 6) for k, v in t.probabilities.items()},
        "needs_review": int(t.needs_review), "review_reasons": ",".join(t.reasons),
        "high_risk_rules": ",".join(t.rules_hit), "quality_issues": ",".join(d.quality.issues),
        "sharpness": d.quality.sharpness, "brightness": d.quality.brightness,
        "clipped_dark": d.quality.clipped_dark, "clipped_bright": d.quality.clipped_bright,
        "image_format": d.header.format, "width": d.header.width, "height": d.header.height,
        "decode_reduction": d.reduction, "spot_checked": int(spot_checked), "spot_label": spot_label,
        "latency_ms": latency_ms, "ood_score": ood_score,
    }
