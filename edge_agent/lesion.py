"""Find the lesion in a dermoscopy frame, so the model sees it at one scale whatever the camera.

Why: a lesion fills most of a HAM10000 frame but sits small in a wide field on other clinics'
dermatoscopes (and in ISIC 2017's 256x256 squeezes of large photographs). The model, trained on
the first, sees the second's structures too small: scoring the HAM10000-only model at 288 px
instead of 192 raised its melanoma AUC on ISIC 2017 by 0.05, and cropping each image to the
lesion (this module) by 0.04 at the same input size, without any retraining
(docs/generalisation.md). A crop adapts per image, where a fixed centre crop or a larger input
helps one source and hurts another.

The segmentation is deliberately classical (OpenCV only, about a millisecond on a 128-pixel
thumbnail) and conservative: when it cannot find one plausible lesion it says so (`None`), and
the caller falls back to the plain centre crop - the model then sees what it saw before.
"""
from __future__ import annotations

import numpy as np

WORK_SIDE = 128     # the thumbnail the segmentation runs on (long side, pixels)
DARK_FIELD = 35     # L* (0-255 scale) below which a border-connected region is the scope's black field
MIN_FIELD = 0.2     # less visible skin than this (fraction of the frame): no crop
MIN_AREA = 0.004    # a candidate smaller than this fraction of the visible field is noise
CENTRE_SIGMA = 0.25  # candidates are weighted by exp(-(distance from centre / diagonal / sigma)^2)


def lesion_box(img: np.ndarray, margin: float = 0.15, order: str = "RGB") -> tuple[int, int, int, int] | None:
    """(x0, y0, x1, y1) of a square around the lesion, `margin` of its size added on each side and
    clipped to fit the frame; None when there is no single plausible lesion (or the image is not
    an HxWx3 uint8 array, which preprocessing then refuses with its own message).

    Steps: lightness (CIE L*) of a thumbnail, blurred; the dermatoscope's dark field (very dark
    regions touching the border) is left out; Otsu's threshold over the rest splits darker
    lesion from skin; after a morphological open/close, the connected component with the largest
    area weighted towards the centre, and halved per frame edge it touches (hair and shadows run
    off the edge; a lesion usually does not), is the lesion.
    """
    import cv2  # in the function: the agent's main process never imports OpenCV (preprocess.py says why)

    if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3 or min(img.shape[:2]) < 8:
        return None
    h, w = img.shape[:2]
    s = WORK_SIDE / max(h, w)
    sw, sh = max(8, round(w * s)), max(8, round(h * s))
    src = img
    if min(h, w) > 4 * min(sh, sw):  # a camera original: subsample first, area-averaging 12 MP costs ~10 ms
        src = cv2.resize(img, (4 * sw, 4 * sh), interpolation=cv2.INTER_NEAREST)
    small = cv2.resize(src, (sw, sh), interpolation=cv2.INTER_AREA)
    light = cv2.cvtColor(small, cv2.COLOR_RGB2LAB if order == "RGB" else cv2.COLOR_BGR2LAB)[:, :, 0]
    light = cv2.GaussianBlur(light, (5, 5), 0)
    field = _visible_field(light)
    n_field = int(field.sum())
    if n_field < MIN_FIELD * field.size:
        return None
    thr, _ = cv2.threshold(light[field].reshape(-1, 1), 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    mask = ((light <= thr) & field).astype(np.uint8)
    k = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (5, 5))
    mask = cv2.morphologyEx(cv2.morphologyEx(mask, cv2.MORPH_OPEN, k), cv2.MORPH_CLOSE, k)
    n, _, stats, centres = cv2.connectedComponentsWithStats(mask, connectivity=8)
    best, best_score = 0, 0.0
    diag = float(np.hypot(sh, sw))
    for i in range(1, n):
        x, y, bw, bh, area = (int(v) for v in stats[i])
        if area < MIN_AREA * n_field:
            continue
        d = float(np.hypot(centres[i][0] - (sw - 1) / 2, centres[i][1] - (sh - 1) / 2)) / diag
        edges = (x == 0) + (y == 0) + (x + bw == sw) + (y + bh == sh)
        score = area * float(np.exp(-(d / CENTRE_SIGMA) ** 2)) * 0.5 ** edges
        if score > best_score:
            best, best_score = i, score
    if not best:
        return None
    x, y, bw, bh, _ = (int(v) for v in stats[best])
    x0, y0, x1, y1 = x / s, y / s, (x + bw) / s, (y + bh) / s
    side = min(max(x1 - x0, y1 - y0) * (1 + 2 * margin), min(h, w))
    bx = min(max((x0 + x1 - side) / 2, 0.0), w - side)
    by = min(max((y0 + y1 - side) / 2, 0.0), h - side)
    X0, Y0, S = int(round(bx)), int(round(by)), max(1, int(round(side)))
    X0, Y0 = min(X0, w - S), min(Y0, h - S)
    return X0, Y0, X0 + S, Y0 + S


def _visible_field(light: np.ndarray) -> np.ndarray:
    """Everything except very dark regions connected to the frame's border (a dermatoscope's
    black circle or corners), which Otsu would otherwise take for the darkest 'lesion'."""
    import cv2

    dark = (light < DARK_FIELD).astype(np.uint8)
    _, lab = cv2.connectedComponents(dark, connectivity=4)
    border = np.unique(np.concatenate([lab[0], lab[-1], lab[:, 0], lab[:, -1]]))
    border = border[border != 0]
    return ~np.isin(lab, border)


def lesion_region(img: np.ndarray, margin: float = 0.15, order: str = "RGB") -> np.ndarray:
    """The square the lesion crop keeps (a view), or the image itself when there is no box."""
    box = lesion_box(img, margin, order)
    if box is None:
        return img
    x0, y0, x1, y1 = box
    return img[y0:y1, x0:x1]
