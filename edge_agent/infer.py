"""Run the bundle's ONNX model with onnxruntime: primary variant, fallback, spot-checks.

The INT8 model is the fast path on edge CPUs, but a quantized graph can fail
to load on an unusual CPU or build of onnxruntime. Rather than stop screening,
the engine switches to the bundle's approved fallback (normally FP32), says so
loudly, and every result records which variant produced it, so a clinician
can tell and `edge-agent status` can count it. If no variant runs, it raises:
files stay in the inbox and nothing is recorded from a broken model.
"""
from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence

import numpy as np
import onnxruntime as ort

from .bundle import Bundle, BundleError
from .config import ConfigError
from .features import check_maps, pool
from .preprocess import flatten_views, mean_over_views

log = logging.getLogger(__name__)
ORT_LOG_ERROR = 3  # onnxruntime severities: 0 verbose, 1 info, 2 warning, 3 error, 4 fatal


def quiet_onnxruntime() -> None:
    """No telemetry and no warnings from onnxruntime itself (idempotent).

    Telemetry is stopped at the root by ORT_DISABLE_TELEMETRY (runtime_env.py, set before the import); this
    also switches off the non-essential events through the API. The default logger at ERROR keeps the
    graph optimizer's per-load warnings ("Removing initializer ... It is not used by any node") out of the
    journal: they come from the default logger as well as from the session's, and say nothing an operator
    can act on. Real failures still raise.
    """
    ort.disable_telemetry_events()
    ort.set_default_logger_severity(ORT_LOG_ERROR)


quiet_onnxruntime()
EventSink = Callable[[str, str], None]


class InferenceError(RuntimeError):
    """No model variant could produce results; the message says what failed and what to do."""


def check_providers(providers: Sequence[str]) -> None:
    available = ort.get_available_providers()
    missing = [p for p in providers if p not in available]
    if missing:
        raise ConfigError(f"execution provider(s) {missing} are not available in this onnxruntime build; available: "
                          f"{available}. Fix the `providers` setting (e.g. CPUExecutionProvider)")


class Engine:
    """Owns the onnxruntime sessions; `infer` is called from the single inference thread."""

    def __init__(self, bundle: Bundle, providers: Sequence[str] = ("CPUExecutionProvider",), threads: int = 1,
                 on_event: EventSink | None = None) -> None:
        self.bundle = bundle
        self.providers = list(providers)
        self.threads = threads
        self.on_event = on_event or (lambda kind, detail: None)
        self.variant: str | None = None
        self._session: ort.InferenceSession | None = None
        self._reference: ort.InferenceSession | None = None
        self._reference_failed = False
        self._lock = threading.Lock()
        self._reference_lock = threading.Lock()

    @property
    def is_fallback(self) -> bool:
        return self.variant is not None and self.variant != self.bundle.primary

    @property
    def can_spot_check(self) -> bool:
        """FP32 cross-checks make sense only while an INT8 model produces the results."""
        return self.variant == "int8" and "fp32" in self.bundle.variants and not self._reference_failed

    def _open(self, variant: str, spot_check: bool = False) -> ort.InferenceSession:
        so = ort.SessionOptions()
        so.intra_op_num_threads = self.threads
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.log_severity_level = ORT_LOG_ERROR
        # Idle worker threads must sleep, not spin: the box does other work and
        # the agent is mostly waiting for images.
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        # Memory patterns pre-plan one block per batch size seen, on top of the
        # arena: tens of MB for no measurable speed on this small model.
        so.enable_mem_pattern = False
        if spot_check:
            # Spot-checks run a few images in a hundred: lean beats fast here. Without the
            # NCHWc layout pass the FP32 weights are not kept a second time in blocked form.
            so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        sess = ort.InferenceSession(self.bundle.model_bytes(variant), sess_options=so, providers=self.providers)
        inputs = {i.name: i for i in sess.get_inputs()}
        outputs = {o.name for o in sess.get_outputs()}
        wanted = [self.bundle.output_name] + ([self.bundle.features_output] if self.bundle.features_output else [])
        if self.bundle.input_name not in inputs or not set(wanted) <= outputs:
            raise InferenceError(f"{variant} model has inputs {sorted(inputs)} and outputs {sorted(outputs)}, but the "
                                 f"manifest says input {self.bundle.input_name!r} and outputs {wanted}; "
                                 "rebuild the bundle")
        return sess

    def load(self) -> str:
        """Open the primary variant (or the fallback if the primary cannot load); returns the variant in use."""
        b = self.bundle
        try:
            self._session, self.variant = self._open(b.primary), b.primary
        except BundleError:
            raise
        except Exception as e:  # onnxruntime raises several unrelated types for a bad model
            if b.fallback is None:
                raise InferenceError(f"the {b.primary} model in {b.path} cannot be loaded ({_short(e)}) and the bundle "
                                     "allows no fallback; rebuild or re-copy the bundle") from e
            log.error("the %s model cannot be loaded (%s); falling back to the %s model", b.primary, _short(e), b.fallback)
            self.on_event("fallback", f"{b.primary} failed to load: {_short(e)}; using {b.fallback}")
            self._switch_to_fallback()
        assert self.variant is not None
        return self.variant

    def _switch_to_fallback(self) -> None:
        b = self.bundle
        assert b.fallback is not None
        try:
            self._session, self.variant = self._open(b.fallback), b.fallback
        except BundleError:
            raise
        except Exception as e:
            raise InferenceError(f"the fallback {b.fallback} model cannot be loaded either ({_short(e)}); "
                                 "rebuild or re-copy the bundle") from e

    def _run(self, sess: ort.InferenceSession, x: np.ndarray, pooled: bool = False
             ) -> tuple[np.ndarray, np.ndarray | None]:
        """Logits, and with `pooled` (format-3 bundles) the pooled features, averaged over the views of a
        multi-view bundle (an N x V x 3 x S x S batch, preprocess.py) and over the TTA views."""
        if x.ndim == 5:
            v = x.shape[1]
            logits, f = self._run_tta(sess, np.ascontiguousarray(flatten_views(x)), pooled)
            return mean_over_views(logits, v), None if f is None else mean_over_views(f, v)
        return self._run_tta(sess, x, pooled)

    def _run_tta(self, sess: ort.InferenceSession, x: np.ndarray, pooled: bool
                 ) -> tuple[np.ndarray, np.ndarray | None]:
        if self.bundle.tta == "hflip":
            # One batch of 2N (image and mirror image), then the mean of the two logits per image:
            # the arithmetic the build evaluated and calibrated (build_model/train.predict_logits).
            both, f = self._run_once(sess, np.ascontiguousarray(np.concatenate([x, x[..., ::-1]])), pooled)
            n = len(x)
            return (both[:n] + both[n:]) / 2, None if f is None else (f[:n] + f[n:]) / 2
        return self._run_once(sess, x, pooled)

    def _run_once(self, sess: ort.InferenceSession, x: np.ndarray, pooled: bool = False
                  ) -> tuple[np.ndarray, np.ndarray | None]:
        maps = self._outputs(sess, x, pooled)
        return maps[0], None if len(maps) == 1 else pool(maps[1])

    def _outputs(self, sess: ort.InferenceSession, x: np.ndarray, features: bool) -> list[np.ndarray]:
        b = self.bundle
        names = [b.output_name] + ([b.features_output] if features and b.features_output else [])
        res = [np.asarray(o) for o in sess.run(names, {b.input_name: x})]
        out = res[0]
        if out.shape != (x.shape[0], len(b.labels)):
            raise InferenceError(f"model output has shape {out.shape}, expected {(x.shape[0], len(b.labels))} "
                                 f"(one logit per manifest label); the model does not match its manifest")
        if not np.all(np.isfinite(out)):
            raise InferenceError("model output is not finite (NaN or infinity): the model is broken")
        if len(res) > 1:
            problem = check_maps(res[1], x.shape[0], b.head.feature_dim if b.head is not None else None)
            if problem:
                raise InferenceError(f"{problem}; the model does not match its manifest: rebuild the bundle")
        return res

    def infer(self, x: np.ndarray) -> tuple[np.ndarray, str]:
        """Logits for a float32 NCHW batch and the variant that produced them."""
        logits, _, variant = self.infer_features(x, pooled=False)
        return logits, variant

    def infer_features(self, x: np.ndarray, pooled: bool = True) -> tuple[np.ndarray, np.ndarray | None, str]:
        """Logits, pooled features (N x C; None for bundles without a feature output) and the variant."""
        with self._lock:
            if self._session is None:
                self.load()
            assert self._session is not None and self.variant is not None
            try:
                return (*self._run(self._session, x, pooled), self.variant)
            except Exception as e:
                b = self.bundle
                if self.variant == b.fallback or b.fallback is None:
                    raise InferenceError(f"the {self.variant} model failed to run ({_short(e)}) and no other variant is "
                                         "allowed; images stay in the inbox - check the bundle with "
                                         "`edge-agent model verify` and restart") from e
                log.error("the %s model failed to run (%s); switching to the %s model", self.variant, _short(e), b.fallback)
                self.on_event("fallback", f"{self.variant} failed to run: {_short(e)}; using {b.fallback}")
                self._switch_to_fallback()
                try:
                    return (*self._run(self._session, x, pooled), self.variant)
                except Exception as e2:
                    raise InferenceError(f"the fallback {self.variant} model failed to run too ({_short(e2)}); images stay "
                                         "in the inbox - rebuild the bundle") from e2

    def feature_maps(self, x: np.ndarray) -> np.ndarray | None:
        """The last feature maps (N x C x h x w) of a preprocessed batch, without TTA, for heatmaps; None when
        the bundle has no feature output. Runs on the variant in use (loaded on first call)."""
        if not self.bundle.features_output:
            return None
        with self._lock:
            if self._session is None:
                self.load()
            assert self._session is not None
            return self._outputs(self._session, x, True)[1]

    def prepare_reference(self) -> None:
        """Open the FP32 spot-check model ahead of the first spot-check (from a spare thread): opening it
        takes a few hundred ms that would otherwise stall the inference thread mid-scan."""
        if not self.can_spot_check:
            return
        try:
            self._reference_session()
        except Exception as e:
            self._disable_reference(e)

    def _reference_session(self) -> ort.InferenceSession:
        with self._reference_lock:
            if self._reference is None:
                self._reference = self._open("fp32", spot_check=True)
            return self._reference

    def _disable_reference(self, e: Exception) -> None:
        if not self._reference_failed:
            self._reference_failed = True
            log.warning("FP32 spot-checks disabled: the FP32 model cannot run (%s)", _short(e))
            self.on_event("spot_check_disabled", f"fp32 cannot run: {_short(e)}")

    def reference(self, x: np.ndarray) -> np.ndarray | None:
        """FP32 logits for spot-checking INT8 results; None when unavailable (logged once)."""
        if not self.can_spot_check:
            return None
        try:
            return self._run(self._reference_session(), x)[0]
        except Exception as e:
            self._disable_reference(e)
            return None


def _short(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text[:300]}"
