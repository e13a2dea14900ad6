"""The model's feature output (bundle format 3): what the network saw, for heatmaps and OOD scores.

A format-3 model has a second ONNX output, the last convolutional feature map
(N x C x h x w), whose spatial mean is exactly what the classifier's linear
layer reads. With that layer's weights (`head.npz`: weight K x C, bias K), a
class activation map is W_k . F(:, i, j) at every position (review app), and
the pooled vector feeds the out-of-distribution score (ood.py). Both come
from the one inference the screening path runs anyway: no second model, no
torch, and the INT8 graph computes the same logits as the one the gate passed
(the output is an extra name on an existing tensor).
"""
from __future__ import annotations

import io
import zipfile
from dataclasses import dataclass

import numpy as np

HEAD_FILE = "head.npz"


class FeatureError(ValueError):
    """The bundle's feature description cannot be used; the message says why."""


@dataclass(frozen=True)
class Head:
    """The classifier's linear layer: logits = weight @ mean(feature map) + bias."""

    weight: np.ndarray  # (K, C) float32
    bias: np.ndarray  # (K,) float32

    @property
    def feature_dim(self) -> int:
        return int(self.weight.shape[1])


def load_head(data: bytes, n_labels: int) -> Head:
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            w, b = z["weight"], z["bias"]
    except (KeyError, ValueError, OSError, zipfile.BadZipFile, EOFError) as e:
        raise FeatureError(f"{HEAD_FILE} cannot be read ({e}); rebuild the bundle") from None
    if w.ndim != 2 or w.shape[0] != n_labels or b.shape != (n_labels,) or not 0 < w.shape[1] <= 8192:
        raise FeatureError(f"{HEAD_FILE} has weight {w.shape} and bias {b.shape}; expected ({n_labels}, C) and "
                           f"({n_labels},), one row per label; rebuild the bundle")
    w32, b32 = w.astype(np.float32), b.astype(np.float32)
    if not (np.all(np.isfinite(w32)) and np.all(np.isfinite(b32))):
        raise FeatureError(f"{HEAD_FILE} holds non-finite numbers; rebuild the bundle")
    return Head(w32, b32)


def pool(maps: np.ndarray) -> np.ndarray:
    """N x C x h x w feature maps -> N x C pooled features (the classifier's input)."""
    return np.asarray(maps, dtype=np.float32).mean(axis=(2, 3))


def check_maps(maps: np.ndarray, n: int, channels: int | None) -> str | None:
    """Why a feature output cannot be used (None when it can): shape and finiteness."""
    if maps.ndim != 4 or maps.shape[0] != n or (channels is not None and maps.shape[1] != channels):
        return f"feature output has shape {maps.shape}, expected ({n}, {channels or 'C'}, h, w)"
    if not np.all(np.isfinite(maps)):
        return "feature output is not finite (NaN or infinity)"
    return None
