"""Heatmaps on demand for the review app: decode (in a worker process), features from the model, CAM.

Never on the screening path: the agent does not compute feature maps; the
review app runs the bundle's model itself when a clinician opens a case, and
keeps the last few hundred maps in memory. A heatmap is shown only when it
can be honest:
- the bundle has a classifier head and a "features" output (bundle format 3):
  otherwise "this bundle has no feature output (format N)";
- the installed bundle is the model that produced the result (same model id):
  a map from another model would explain a different prediction;
- the image file is there and decodes.
Each refusal is a sentence shown on the case page instead of the overlay.
"""
from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..cam import class_activation_map, colorize, crop_box, png_bytes
from ..preprocess import first_view
from .files import NotServable, open_inside
from .imaging import decode_batch

log = logging.getLogger(__name__)
CACHE_ENTRIES = 256
HEATMAP_SIDE = 256


def framed(m: np.ndarray, region: tuple[float, float, float, float], long_side: int = 4 * HEATMAP_SIDE) -> np.ndarray:
    """RGBA canvas with the photo's aspect ratio (the region is a square: its width over its height in
    fractions gives height over width of the photo), transparent but for the map over the region."""
    fw, fh = max(region[2] - region[0], 1e-3), max(region[3] - region[1], 1e-3)
    aspect = fh / fw  # photo width / height
    cw, ch = (long_side, max(1, round(long_side / aspect))) if aspect >= 1 else (max(1, round(long_side * aspect)), long_side)
    x, y, w, h = crop_box(cw, ch, "lesion_crop", region)
    canvas = np.zeros((ch, cw, 4), np.uint8)
    canvas[y:y + h, x:x + w] = colorize(m, (w, h))
    return canvas


@dataclass
class Heatmap:
    png: bytes | None
    why_not: str = ""


class Heatmaps:
    """Loads the bundle and its model once (lazily, on the first heatmap asked for); thread-safe."""

    def __init__(self, bundle_path: Path, trust: Any = None, providers: tuple[str, ...] = ("CPUExecutionProvider",),
                 threads: int = 1, max_pixels: int = 64_000_000) -> None:
        self.bundle_path = bundle_path
        self.trust = trust
        self.providers = providers
        self.threads = threads
        self.max_pixels = max_pixels
        self._lock = threading.Lock()
        self._loaded = False
        self._bundle: Any = None
        self._engine: Any = None
        self._why_not = ""
        self._cache: OrderedDict[tuple[int, str], Heatmap] = OrderedDict()

    def _load(self) -> None:
        if self._loaded:
            return
        self._loaded = True
        try:
            from ..bundle import load_bundle
            from ..infer import Engine

            b = load_bundle(self.bundle_path, self.trust)
        except Exception as e:  # noqa: BLE001 - any bundle problem is a sentence on the page
            self._why_not = f"no heatmap: the model bundle {self.bundle_path} cannot be loaded ({e})"
            return
        self._bundle = b
        version = b.manifest.get("format_version", "?") if isinstance(b.manifest, dict) else "?"
        why = getattr(b, "why_no_heatmap", "no feature output")
        if getattr(b, "head", None) is None or why:
            self._why_not = (f"no heatmap: this bundle has no feature output (format {version}); heatmaps need a "
                             "bundle of format 3 or later, which carries the feature map and the classifier weights "
                             "(`build-model upgrade-bundle`)")
            return
        try:
            eng = Engine(b, self.providers, self.threads)
            eng.load()
        except Exception as e:  # noqa: BLE001
            self._why_not = f"no heatmap: the model cannot be loaded ({e})"
            return
        self._engine = eng

    @property
    def bundle(self) -> Any:
        with self._lock:
            self._load()
        return self._bundle

    def available(self, row: dict[str, Any]) -> str:
        """'' when a heatmap can be made for this result, else why not (in words)."""
        with self._lock:
            self._load()
        if self._why_not:
            return self._why_not
        if row.get("model_id") != self._bundle.model_id:
            return (f"no heatmap: this result was produced by model {row.get('model_id')}, but the installed bundle "
                    f"is {self._bundle.model_id}; a map from another model would not explain this result")
        return ""

    def classes(self, row: dict[str, Any]) -> list[str]:
        """The classes worth a map: the predicted one, then the bundle's high-risk classes."""
        b = self.bundle
        if b is None:
            return []
        out = [row["label"]] if row.get("label") in b.labels else []
        out += [x for x in b.high_risk_labels if x not in out]
        return out

    def get(self, row: dict[str, Any], label: str, roots: tuple[Path, ...]) -> Heatmap:
        key = (int(row["id"]), label)
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None:
                self._cache.move_to_end(key)
                return hit
        why = self.available(row)
        if why:
            return Heatmap(None, why)
        b = self._bundle
        if label not in b.labels:
            return Heatmap(None, f"no heatmap: {label!r} is not a label of this bundle")
        try:
            f = open_inside(row.get("stored_path"), roots)
        except NotServable as e:
            return Heatmap(None, f"no heatmap: {e}")
        dec = decode_batch([(0, f)], b.preprocessing, self.max_pixels, want_thumb=False).get(0)
        if dec is None or dec.tensor is None:
            return Heatmap(None, f"no heatmap: {dec.error if dec else 'the image could not be decoded'}")
        hm = self.from_tensor(dec.tensor, label, dec.region)
        with self._lock:
            self._cache[key] = hm
            while len(self._cache) > CACHE_ENTRIES:
                self._cache.popitem(last=False)
        return hm

    def cam(self, tensor: np.ndarray, label: str) -> np.ndarray | None:
        """The CAM (h, w in [0, 1]) of `label` for one preprocessed image, averaged with the mirror image's when
        the bundle screens with horizontal-flip TTA (so the map explains the logits the agent used)."""
        b, eng = self._bundle, self._engine
        x = first_view(tensor)[None].astype(np.float32)  # a multi-view bundle: the map of its first square
        if getattr(b, "tta", "none") == "hflip":
            x = np.ascontiguousarray(np.concatenate([x, x[..., ::-1]]))
        with self._lock:
            feats = eng.feature_maps(x)
        if feats is None:
            return None
        head = b.head
        k = b.labels.index(label)
        cams = [class_activation_map(feats[0], head.weight, head.bias, k)]
        if len(feats) == 2:
            cams.append(class_activation_map(feats[1], head.weight, head.bias, k)[:, ::-1])
        m = np.mean(cams, axis=0)
        top = float(m.max())
        return (m / top).astype(np.float32) if top > 0 else m.astype(np.float32)

    def from_tensor(self, tensor: np.ndarray, label: str,
                    region: tuple[float, float, float, float] | None = None) -> Heatmap:
        """The map as a PNG: the model's square, or for a `lesion_crop` bundle (`region` given) a transparent
        canvas of the photo's shape with the map where the lesion square was, since the page cannot know
        where the crop fell without decoding the photo again."""
        try:
            m = self.cam(tensor, label)
        except Exception as e:  # noqa: BLE001 - a model error is a sentence on the page
            log.warning("heatmap failed: %s", e)
            return Heatmap(None, f"no heatmap: the model failed on this image ({type(e).__name__}: {str(e)[:200]})")
        if m is None:
            version = self._bundle.manifest.get("format_version", "?")
            return Heatmap(None, f"no heatmap: this bundle has no feature output (format {version})")
        if region is None:
            return Heatmap(png_bytes(colorize(m, (HEATMAP_SIDE, HEATMAP_SIDE))))
        return Heatmap(png_bytes(framed(m, region)))
