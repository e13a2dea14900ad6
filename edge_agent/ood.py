"""Out-of-distribution score: how unlike the build's training images an image's features are.

A classifier has to answer one of its labels for anything it is shown, so a photo
of a keyboard comes back as a confident nevus. What the model's own penultimate
features say is more honest: images like the training images land near one of
the class centres the build measured, other pictures land far away. The score is
the class-conditional Mahalanobis distance with one shared (tied, Ledoit-Wolf
shrunk) covariance (Lee et al., NeurIPS 2018), computed on the pooled features
of the variant that produced the result, divided by the feature dimension so
that in-distribution images score around 1 whatever the model.

This module is the one definition used by both sides: build_model fits the
statistics with `fit` and writes them with `save`; the agent loads them with
`load` and scores every image with `OodModel.score`. Pure numpy: the agent
never imports torch.

Storage (`ood.npz` in the bundle, docs/bundle-format.md): per variant
`<variant>_whiten` (C x C, float16 when it fits - half the bytes, a relative
error of about 1e-3 on a score whose threshold sits at the 98th percentile -
else float32) and
`<variant>_means` (K x C, whitened class means, float32). The score is
min_k ||x W - m_k||^2 / C.
"""
from __future__ import annotations

import io
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

METHOD = "mahalanobis-tied"
REASON = "out_of_distribution"
MAX_FEATURES = 8192  # a pooled feature vector longer than this is not an EfficientNet-Lite's


class OodError(ValueError):
    """The bundle's OOD statistics cannot be used; the message says why and what to do."""


@dataclass(frozen=True)
class OodModel:
    """Whitening and class centres per model variant, and the threshold above which an image is flagged."""

    whiten: dict[str, np.ndarray]  # variant -> (C, C) float32
    means: dict[str, np.ndarray]  # variant -> (K, C) float32, already whitened
    thresholds: dict[str, float]  # variant -> score threshold (chosen on the build's validation images)
    method: str = METHOD

    @property
    def feature_dim(self) -> int:
        return next(iter(self.whiten.values())).shape[0]

    def score(self, pooled: np.ndarray, variant: str) -> np.ndarray:
        """One score per row of `pooled` (N x C features of `variant`); larger = less like the training data."""
        return score(pooled, self.whiten[variant], self.means[variant])

    def flags(self, scores: np.ndarray, variant: str) -> np.ndarray:
        return np.asarray(scores) > self.thresholds[variant]


def score(pooled: np.ndarray, whiten: np.ndarray, means: np.ndarray) -> np.ndarray:
    x = np.asarray(pooled, dtype=np.float32)
    if x.ndim != 2 or x.shape[1] != whiten.shape[0]:
        raise OodError(f"features have shape {x.shape}, the OOD statistics expect (N, {whiten.shape[0]})")
    z = x @ whiten
    # ||z - m||^2 = ||z||^2 - 2 z.m + ||m||^2, for all classes at once (N x K)
    d2 = (z * z).sum(1, keepdims=True) - 2.0 * z @ means.T + (means * means).sum(1)[None, :]
    return np.maximum(d2.min(1), 0.0) / x.shape[1]


def fit(features: np.ndarray, classes: np.ndarray, shrinkage: float) -> tuple[np.ndarray, np.ndarray]:
    """Whitening matrix and whitened class means from training features (N x C) and their class indices.

    `shrinkage` (0..1) blends the pooled within-class covariance with a scaled identity, as
    Ledoit-Wolf estimates it (the build computes it with scikit-learn); 1280 dimensions from a few
    thousand images would otherwise give a near-singular covariance whose inverse amplifies noise.
    Classes with no image get no centre.
    """
    x = np.asarray(features, dtype=np.float64)
    cls = np.asarray(classes)
    present = [k for k in np.unique(cls)]
    mu = np.stack([x[cls == k].mean(0) for k in present])
    resid = x - mu[np.searchsorted(present, cls)]
    cov = resid.T @ resid / max(len(x) - len(present), 1)
    cov = (1 - shrinkage) * cov + shrinkage * np.trace(cov) / cov.shape[0] * np.eye(cov.shape[0])
    vals, vecs = np.linalg.eigh(cov)
    # Floor the spectrum: a dead feature (always 0, common in a barely trained model) has variance 0, and
    # its inverse would be infinite; 1e-12 absolute keeps an all-zero toy model finite too.
    vals = np.maximum(vals, max(float(vals.max()) * 1e-9, 1e-12))
    w = vecs / np.sqrt(vals)[None, :]  # x W has identity covariance within classes
    return w.astype(np.float32), (mu @ w).astype(np.float32)


def stored(w: np.ndarray) -> np.ndarray:
    """The whitening matrix as `save` stores it: float16 when every entry fits (the usual case: half the bytes),
    float32 otherwise (a near-singular covariance gives entries beyond float16's 65504)."""
    w = np.asarray(w, dtype=np.float32)
    return w.astype(np.float16) if np.all(np.isfinite(w)) and float(np.abs(w).max(initial=0.0)) < 6e4 else w


def save(path: Path, per_variant: dict[str, tuple[np.ndarray, np.ndarray]]) -> None:
    arrays: dict[str, np.ndarray] = {}
    for variant, (w, m) in per_variant.items():
        arrays[f"{variant}_whiten"] = stored(w)
        arrays[f"{variant}_means"] = m.astype(np.float32)
    with open(path, "wb") as f:
        np.savez_compressed(f, **arrays)


def load(data: bytes, spec: dict, variants: list[str]) -> OodModel:
    """Parse the verified bytes of ood.npz against the manifest's `ood` block; OodError says what is wrong."""
    thresholds = spec.get("thresholds")
    if spec.get("method") != METHOD:
        raise OodError(f"ood.method {spec.get('method')!r} is not one this agent knows ({METHOD!r}): upgrade edge-agent")
    if not isinstance(thresholds, dict):
        raise OodError("ood.thresholds must map each model variant to a number; rebuild the bundle")
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except (ValueError, OSError, zipfile.BadZipFile, EOFError) as e:
        raise OodError(f"ood statistics cannot be read ({e}); rebuild the bundle") from None
    whiten, means, th = {}, {}, {}
    for v in variants:
        w, m, t = arrays.get(f"{v}_whiten"), arrays.get(f"{v}_means"), thresholds.get(v)
        if w is None or m is None:
            raise OodError(f"ood statistics have no arrays for the {v} model; rebuild the bundle")
        if (w.ndim != 2 or w.shape[0] != w.shape[1] or not 0 < w.shape[0] <= MAX_FEATURES
                or m.ndim != 2 or m.shape[1] != w.shape[0] or not 0 < m.shape[0] <= 1000):
            raise OodError(f"ood statistics for {v} have shapes {w.shape} and {m.shape}; expected (C, C) and (K, C)")
        if not isinstance(t, (int, float)) or isinstance(t, bool) or not np.isfinite(t) or t <= 0:
            raise OodError(f"ood.thresholds.{v} is {t!r}; it must be a positive number")
        w32, m32 = w.astype(np.float32), m.astype(np.float32)
        if not (np.all(np.isfinite(w32)) and np.all(np.isfinite(m32))):
            raise OodError(f"ood statistics for {v} are not finite numbers; rebuild the bundle")
        whiten[v], means[v], th[v] = w32, m32, float(t)
    return OodModel(whiten, means, th, METHOD)
