"""Turn a decoded image into the model's input tensor, exactly as the bundle says.

This module is the single implementation of the preprocessing contract: the
build imports it for validation, calibration and quantization, and the agent
for screening, so the numbers in a bundle's report are the numbers the agent
reproduces. It only depends on numpy and OpenCV.

OpenCV is imported inside the functions that use it (as in decode.py and lesion.py): the agent's main
process needs this module's contract (Preprocessing, the view helpers) but never touches pixels - the
decode workers do - and importing OpenCV there would cost 17 MB of its resident memory for nothing.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from .lesion import lesion_region

RESIZE_RULES = ("shorter_side_center_crop", "stretch", "lesion_crop")
COLOR_CONSTANCY = ("none", "shades_of_gray")


@dataclass(frozen=True)
class Preprocessing:
    """The manifest's `preprocessing` block."""

    input_size: int = 160
    color_order: str = "RGB"
    resize: str = "shorter_side_center_crop"
    interpolation: str = "area"
    color_constancy: str = "shades_of_gray"
    shades_of_gray_p: int = 6
    mean: tuple[float, float, float] = (127.0, 127.0, 127.0)
    std: tuple[float, float, float] = (128.0, 128.0, 128.0)
    layout: str = "NCHW"
    lesion_margin: float = 0.15   # resize "lesion_crop": margin around the lesion, a fraction of its size per side
    # Several views of one image (resize rules, the first = `resize`), whose logits are averaged: the
    # centre square keeps the lesion's size in the dermatoscope's field, the lesion square fixes the scale
    # when the lesion is small in its frame (docs/generalisation.md). Empty: the one view `resize`.
    views: tuple[str, ...] = ()
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def rules(self) -> tuple[str, ...]:
        """The resize rule of each view the model sees, in tensor order."""
        return self.views or (self.resize,)

    @property
    def n_views(self) -> int:
        return len(self.rules)

    @property
    def source_size(self) -> int:
        """The shorter side a decoder should keep an image at (before its oversampling): the input
        size, doubled for `lesion_crop`, whose square can be a quarter of the frame's side - a small
        lesion's square is then cut from real pixels, not enlarged from a reduced decode."""
        return self.input_size * (2 if "lesion_crop" in self.rules else 1)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        d.pop("extra")
        if "lesion_crop" not in self.rules:  # manifests of the older rules stay as they were
            d.pop("lesion_margin")
        if self.views:
            d["views"] = list(self.views)
        else:
            d.pop("views")
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Preprocessing":
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__ and k != "extra"}
        views = d.get("views", ())
        problem = views_problem(views) if views != [] and views != () else ""
        if problem:
            raise ValueError(f"preprocessing views {views!r} in the bundle manifest {problem}; rebuild the bundle")
        p = cls(**{**known, "mean": tuple(d.get("mean", cls.mean)), "std": tuple(d.get("std", cls.std)),
                   "views": tuple(views)})
        if p.views and p.views[0] != p.resize:
            raise ValueError(f"preprocessing views {list(p.views)} in the bundle manifest must name two or more different "
                             f"resize rules, the first being resize {p.resize!r}; rebuild the bundle")
        if p.resize not in RESIZE_RULES:
            raise ValueError(f"unknown resize rule {p.resize!r} in the bundle manifest; this agent knows {RESIZE_RULES}: upgrade the agent or rebuild the bundle")
        if p.color_constancy not in COLOR_CONSTANCY:
            raise ValueError(f"unknown color_constancy {p.color_constancy!r} in the bundle manifest; this agent knows {COLOR_CONSTANCY}")
        if not (isinstance(p.lesion_margin, (int, float)) and 0 <= p.lesion_margin <= 2):
            raise ValueError(f"lesion_margin {p.lesion_margin!r} in the bundle manifest must be a number from 0 to 2; rebuild the bundle")
        if p.color_order not in ("RGB", "BGR") or p.layout != "NCHW":
            raise ValueError(f"unsupported color_order/layout {p.color_order}/{p.layout} in the bundle manifest (RGB|BGR, NCHW)")
        return p


def views_problem(views: object) -> str:
    """Why `views` is not a list of two or more different known resize rules ('' when it is): the one check
    behind a manifest, `build-model --views` and a recipe's validate stage."""
    if not (isinstance(views, (list, tuple)) and all(isinstance(v, str) for v in views)):
        return "must be a list of resize rules"
    unknown = [v for v in views if v not in RESIZE_RULES]
    if unknown:
        return f"names unknown resize rule {unknown[0]!r} (known: {', '.join(RESIZE_RULES)})"
    if len(views) < 2 or len(set(views)) != len(views):
        return "must name two or more different resize rules"
    return ""


def resize_and_crop(rgb: np.ndarray, size: int, rule: str = "shorter_side_center_crop",
                    interpolation: str = "area", margin: float = 0.15, order: str = "RGB") -> np.ndarray:
    """Resize so the shorter side is `size`, then take the centred square.

    Dermoscopy frames put the lesion in the middle; cropping the long side
    keeps its aspect ratio, where stretching would distort shape features.
    Area interpolation when shrinking (anti-aliasing for 4000x3000 camera
    images), `interpolation` when enlarging. `lesion_crop` first cuts the
    square around the lesion (`lesion.lesion_box`, `margin`; `order` is the
    channel order, for the lightness) and falls back to the centre crop when
    no lesion is found.
    """
    import cv2  # here, not at the top: see the module docstring

    if rule == "lesion_crop":
        rgb, rule = lesion_region(rgb, margin, order), "shorter_side_center_crop"
    if rule not in RESIZE_RULES:
        raise ValueError(f"unknown resize rule {rule!r}; one of {RESIZE_RULES}")
    h, w = rgb.shape[:2]
    if rule == "stretch":
        return cv2.resize(rgb, (size, size), interpolation=_pick(interpolation, h * w > size * size))
    scale = size / min(h, w)
    nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
    out = cv2.resize(rgb, (nw, nh), interpolation=_pick(interpolation, scale < 1))
    y, x = (nh - size) // 2, (nw - size) // 2
    return out[y:y + size, x:x + size]


def _pick(interpolation: str, shrinking: bool) -> int:
    import cv2

    if interpolation == "area" and not shrinking:
        return cv2.INTER_LINEAR
    return {"area": cv2.INTER_AREA, "linear": cv2.INTER_LINEAR, "cubic": cv2.INTER_CUBIC}[interpolation]


def shades_of_gray_gains(planes: list[np.ndarray], p: int = 6) -> np.ndarray:
    """Shades-of-Gray colour constancy (Finlayson & Trezzi 2004): one gain per channel.

    The illuminant is estimated as the Minkowski p-norm of each channel, and
    dividing it out makes a camera's white balance or a clinic's lamp matter
    less (standard for dermoscopy, Barata et al.). The p-norm of a uint8
    channel is computed from its 256-bin histogram, exactly and in float64:
    a weighted sum of 256 powers instead of raising every pixel to the 6th.
    """
    import cv2

    v = _POWERS.get(p)
    if v is None:
        v = np.arange(256, dtype=np.float64) ** p
    norm = np.empty(len(planes))
    for c, plane in enumerate(planes):
        hist = cv2.calcHist([plane], [0], None, [256], [0, 256]).ravel().astype(np.float64)
        norm[c] = (hist @ v / plane.size) ** (1.0 / p)
    return norm.mean() / np.maximum(norm, 1e-6)


_POWERS = {6: np.arange(256, dtype=np.float64) ** 6}
_LEVELS = np.arange(256, dtype=np.float64)


def to_tensor(rgb_square: np.ndarray, pre: Preprocessing) -> np.ndarray:
    """Colour-correct and normalize an already resized HxWx3 uint8 RGB image to CxHxW float32."""
    return _planes_to_tensor(_planes(rgb_square), pre)


def _planes(img: np.ndarray) -> list[np.ndarray]:
    if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f"preprocessing needs an HxWx3 uint8 image, got {img.dtype} {img.shape}")
    import cv2

    return list(cv2.split(img))


def _planes_to_tensor(rgb: list[np.ndarray], pre: Preprocessing) -> np.ndarray:
    """Per channel the whole chain is a function of the uint8 value,
    clip(v * gain, 0, 255) then (x - mean) / std, so it runs as one 256-entry
    lookup table per channel, written straight into the CHW output."""
    import cv2

    if pre.color_order == "BGR":
        rgb = rgb[::-1]
    gains = shades_of_gray_gains(rgb, pre.shades_of_gray_p) if pre.color_constancy == "shades_of_gray" \
        else np.ones(3)
    out = np.empty((3, *rgb[0].shape), np.float32)
    for c, plane in enumerate(rgb):
        lut = ((np.minimum(_LEVELS * gains[c], 255.0) - pre.mean[c]) / pre.std[c]).astype(np.float32)
        out[c] = cv2.LUT(plane, lut)
    return out


def preprocess(rgb: np.ndarray, pre: Preprocessing) -> np.ndarray:
    """Full contract: HxWx3 uint8 RGB of any size -> 3xSxS float32, or Vx3xSxS with several views."""
    views = [to_tensor(resize_and_crop(rgb, pre.input_size, rule, pre.interpolation, pre.lesion_margin), pre)
             for rule in pre.rules]
    return np.stack(views) if pre.views else views[0]


def preprocess_bgr(bgr: np.ndarray, pre: Preprocessing) -> np.ndarray:
    """`preprocess` for OpenCV's BGR order, without converting the full-size image to RGB first."""
    views = [_planes_to_tensor(_planes(resize_and_crop(bgr, pre.input_size, rule, pre.interpolation,
                                                       pre.lesion_margin, order="BGR"))[::-1], pre)
             for rule in pre.rules]
    return np.stack(views) if pre.views else views[0]


def first_view(tensor: np.ndarray) -> np.ndarray:
    """The 3xSxS tensor of the first view (the `resize` rule's), for what explains one square (heatmaps)."""
    return tensor[0] if tensor.ndim == 4 else tensor


def flatten_views(x: np.ndarray) -> np.ndarray:
    """An N x V x 3 x S x S batch as (N*V) x 3 x S x S (image-major), for a model that takes one view each;
    a 4-D batch is returned as it is."""
    return x.reshape(-1, *x.shape[2:]) if x.ndim == 5 else x


def mean_over_views(out: np.ndarray, n_views: int) -> np.ndarray:
    """The per-image mean of image-major (N*V) x K outputs: what a multi-view bundle screens on."""
    return out if n_views == 1 else out.reshape(-1, n_views, *out.shape[1:]).mean(1)
