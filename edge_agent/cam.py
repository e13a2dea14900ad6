"""Class activation maps (CAM, Zhou et al. 2016) in numpy: where in the image the model found its evidence.

Why numpy and not a gradient method: the classifier of the bundled models is
global average pooling followed by one linear layer, so the logit of class k
is exactly mean_xy(sum_c W[k, c] * F[c, x, y]) + b[k]. The per-position sum
(before the mean) is therefore the exact spatial decomposition of the logit;
no autograd, no torch, and the agent's INT8 path is untouched: the review app
runs the bundle's model with its second output ("features", bundle format 3)
and multiplies by the classifier weights shipped in the bundle.

The map is a hint for the clinician ("the model looked here"), not a
segmentation: it is shown over the image at an adjustable opacity, never
instead of it.
"""
from __future__ import annotations

import numpy as np


class CamError(ValueError):
    """Feature map and classifier weights do not fit together; the message says which shapes."""


def class_activation_map(features: np.ndarray, weight: np.ndarray, bias: np.ndarray, cls: int) -> np.ndarray:
    """CAM of class `cls`: sum_c weight[cls, c] * features[c], ReLU, scaled to [0, 1]. Shape (h, w), float32.

    features: (C, h, w) last convolutional feature map of one image; weight: (K, C); bias: (K,).
    The bias adds the same constant at every position, so it does not change where the map is hot; it is
    accepted (and checked) so callers pass the classifier head as it is.

    Edge cases, each with a defined answer rather than NaN in the browser:
    - non-finite values (NaN/inf from a broken model) count as 0 evidence at that position;
    - a flat map (no position above any other after the ReLU: e.g. all evidence negative, i.e. the image
      speaks against the class everywhere) is all zeros - "nothing in particular", not "everything";
    - otherwise the map is divided by its maximum, so the hottest position is exactly 1.
    """
    f = np.asarray(features, dtype=np.float32)
    w = np.asarray(weight, dtype=np.float32)
    b = np.asarray(bias, dtype=np.float32)
    if f.ndim != 3:
        raise CamError(f"features must be (C, h, w), got shape {f.shape}")
    if w.ndim != 2 or w.shape[1] != f.shape[0]:
        raise CamError(f"weight must be (K, C={f.shape[0]}), got shape {w.shape}")
    if b.shape != (w.shape[0],):
        raise CamError(f"bias must be (K={w.shape[0]},), got shape {b.shape}")
    if not 0 <= int(cls) < w.shape[0]:
        raise CamError(f"class index {cls} out of range 0..{w.shape[0] - 1}")
    cam = np.tensordot(w[int(cls)], f, axes=(0, 0))  # (h, w)
    cam = np.where(np.isfinite(cam), cam, 0.0).astype(np.float32)
    cam = np.maximum(cam, 0.0)
    top = float(cam.max()) if cam.size else 0.0
    if top <= 1e-12:  # flat: no position carries more evidence than another
        return np.zeros(cam.shape, np.float32)
    return (cam / top).astype(np.float32)


def colorize(cam: np.ndarray, size: tuple[int, int] | None = None, max_alpha: float = 0.85) -> np.ndarray:
    """The map as an RGBA image (uint8, H x W x 4) with OpenCV's JET colormap; alpha grows with the value,
    so cold regions stay transparent and the photo shows through. size: (width, height) to resize to
    (bilinear, so the coarse grid does not show as blocks)."""
    import cv2

    m = np.clip(np.nan_to_num(np.asarray(cam, np.float32)), 0.0, 1.0)
    if size is not None:
        m = cv2.resize(m, (int(size[0]), int(size[1])), interpolation=cv2.INTER_LINEAR)
    u8 = (m * 255.0 + 0.5).astype(np.uint8)
    bgr = cv2.applyColorMap(u8, cv2.COLORMAP_JET)
    alpha = (np.clip(m * 1.5, 0.0, 1.0) * max_alpha * 255.0 + 0.5).astype(np.uint8)
    return np.dstack([bgr[..., ::-1], alpha])


def crop_box(width: int, height: int, resize_rule: str = "shorter_side_center_crop",
             region: tuple[float, float, float, float] | None = None) -> tuple[int, int, int, int]:
    """(x, y, w, h) of the part of a width x height image the model saw (preprocess.resize_and_crop): the
    centred square of the shorter side, the whole image for the "stretch" rule, or for "lesion_crop" the
    square around the lesion (`region`, fractions of the image: decode.Decoded.region)."""
    if resize_rule == "stretch":
        return 0, 0, width, height
    if resize_rule == "lesion_crop" and region is not None:
        x0, y0 = round(region[0] * width), round(region[1] * height)
        x1, y1 = max(x0 + 1, round(region[2] * width)), max(y0 + 1, round(region[3] * height))
        return x0, y0, min(x1, width) - x0, min(y1, height) - y0
    side = min(width, height)
    return (width - side) // 2, (height - side) // 2, side, side


def overlay(bgr: np.ndarray, cam: np.ndarray, alpha: float = 0.45,
            resize_rule: str = "shorter_side_center_crop",
            region: tuple[float, float, float, float] | None = None) -> np.ndarray:
    """The photo (H x W x 3 uint8 BGR) with the map blended over the region the model saw, at opacity
    `alpha` (0: photo only, 1: map only where it is hot). Returns a new BGR image of the same size."""
    if bgr.ndim != 3 or bgr.shape[2] != 3 or bgr.dtype != np.uint8:
        raise CamError(f"overlay needs an H x W x 3 uint8 image, got {bgr.dtype} {bgr.shape}")
    alpha = float(np.clip(alpha, 0.0, 1.0))
    h, w = bgr.shape[:2]
    x, y, cw, ch = crop_box(w, h, resize_rule, region)
    rgba = colorize(cam, (cw, ch), max_alpha=1.0)
    color = rgba[..., 2::-1].astype(np.float32)  # back to BGR
    a = (rgba[..., 3:4].astype(np.float32) / 255.0) * alpha
    out = bgr.copy()
    region = out[y:y + ch, x:x + cw].astype(np.float32)
    out[y:y + ch, x:x + cw] = np.clip(region * (1.0 - a) + color * a, 0, 255).astype(np.uint8)
    return out


def png_bytes(image: np.ndarray) -> bytes:
    """PNG of an RGBA (H x W x 4) or BGR (H x W x 3) uint8 image."""
    import cv2

    img = image
    if img.ndim == 3 and img.shape[2] == 4:
        img = np.dstack([img[..., 2::-1], img[..., 3]])  # RGBA -> BGRA for OpenCV
    ok, buf = cv2.imencode(".png", img)
    if not ok:
        raise CamError("OpenCV could not encode the PNG")
    return buf.tobytes()
