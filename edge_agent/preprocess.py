"""Turn a decoded image into the model's input tensor, exactly as the bundle says.

This module is the single implementation of the preprocessing contract: the
build imports it for validation, calibration and quantization, and the agent
for screening, so the numbers in a bundle's report are the numbers the agent
reproduces. It only depends on numpy and OpenCV.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import cv2
import numpy as np

RESIZE_RULES = ("shorter_side_center_crop", "stretch")
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
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        d.pop("extra")
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Preprocessing":
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__ and k != "extra"}
        p = cls(**{**known, "mean": tuple(d.get("mean", cls.mean)), "std": tuple(d.get("std", cls.std))})
        if p.resize not in RESIZE_RULES:
            raise ValueError(f"unknown resize rule {p.resize!r} in the bundle manifest; this agent knows {RESIZE_RULES}: upgrade the agent or rebuild the bundle")
        if p.color_constancy not in COLOR_CONSTANCY:
            raise ValueError(f"unknown color_constancy {p.color_constancy!r} in the bundle manifest; this agent knows {COLOR_CONSTANCY}")
        if p.color_order not in ("RGB", "BGR") or p.layout != "NCHW":
            raise ValueError(f"unsupported color_order/layout {p.color_order}/{p.layout} in the bundle manifest (RGB|BGR, NCHW)")
        return p


_INTERP = {"area": cv2.INTER_AREA, "linear": cv2.INTER_LINEAR, "cubic": cv2.INTER_CUBIC}


def resize_and_crop(rgb: np.ndarray, size: int, rule: str = "shorter_side_center_crop",
                    interpolation: str = "area") -> np.ndarray:
    """Resize so the shorter side is `size`, then take the centred square.

    Dermoscopy frames put the lesion in the middle; cropping the long side
    keeps its aspect ratio, where stretching would distort shape features.
    Area interpolation when shrinking (anti-aliasing for 4000x3000 camera
    images), `interpolation` when enlarging.
    """
    h, w = rgb.shape[:2]
    if rule == "stretch":
        return cv2.resize(rgb, (size, size), interpolation=_pick(interpolation, h * w > size * size))
    scale = size / min(h, w)
    nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
    out = cv2.resize(rgb, (nw, nh), interpolation=_pick(interpolation, scale < 1))
    y, x = (nh - size) // 2, (nw - size) // 2
    return out[y:y + size, x:x + size]


def _pick(interpolation: str, shrinking: bool) -> int:
    if interpolation == "area" and not shrinking:
        return cv2.INTER_LINEAR
    return _INTERP[interpolation]


def shades_of_gray(rgb: np.ndarray, p: int = 6) -> np.ndarray:
    """Shades-of-Gray colour constancy (Finlayson & Trezzi 2004).

    Divides out the illuminant estimated as the Minkowski p-norm of each
    channel, so a camera's white balance or a clinic's lamp matters less.
    Standard preprocessing for dermoscopy from several sources (Barata et al.).
    """
    img = rgb.astype(np.float32)
    norm = np.power(np.mean(np.power(img, p), axis=(0, 1)), 1.0 / p)
    gain = norm.mean() / np.maximum(norm, 1e-6)
    return np.clip(img * gain, 0, 255)


def to_tensor(rgb_square: np.ndarray, pre: Preprocessing) -> np.ndarray:
    """Colour-correct and normalize an already resized HxWx3 uint8 RGB image to CxHxW float32."""
    img = shades_of_gray(rgb_square, pre.shades_of_gray_p) if pre.color_constancy == "shades_of_gray" \
        else rgb_square.astype(np.float32)
    if pre.color_order == "BGR":
        img = img[..., ::-1]
    img = (img - np.asarray(pre.mean, np.float32)) / np.asarray(pre.std, np.float32)
    return np.ascontiguousarray(img.transpose(2, 0, 1))


def preprocess(rgb: np.ndarray, pre: Preprocessing) -> np.ndarray:
    """Full contract: HxWx3 uint8 RGB of any size -> 3xSxS float32."""
    return to_tensor(resize_and_crop(rgb, pre.input_size, pre.resize, pre.interpolation), pre)
