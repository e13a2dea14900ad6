"""Training augmentation with OpenCV/numpy (torchvision does not import here).

Chosen for the images the model will meet outside HAM10000: other cameras,
sizes, lighting and white balance. Geometry: any rotation and flip (a lesion
has no up), random resized crops (zoom and framing differ between
dermatoscopes). Colour: brightness, contrast, saturation, hue, per-channel
gain (white balance) and gamma, plus mild blur and JPEG-like noise for cheap
optics. The output is the square RGB uint8 image that `preprocess.to_tensor`
then colour-corrects and normalizes, like at inference.
"""
from __future__ import annotations

import cv2
import numpy as np


def random_resized_crop(img: np.ndarray, size: int, rng: np.random.Generator,
                        scale: tuple[float, float] = (0.45, 1.0), ratio: tuple[float, float] = (0.8, 1.25)) -> np.ndarray:
    h, w = img.shape[:2]
    area = h * w
    for _ in range(10):
        a = area * rng.uniform(*scale)
        r = np.exp(rng.uniform(np.log(ratio[0]), np.log(ratio[1])))
        cw, ch = int(round(np.sqrt(a * r))), int(round(np.sqrt(a / r)))
        if 0 < cw <= w and 0 < ch <= h:
            x, y = rng.integers(0, w - cw + 1), rng.integers(0, h - ch + 1)
            crop = img[y:y + ch, x:x + cw]
            break
    else:
        s = min(h, w)
        crop = img[(h - s) // 2:(h - s) // 2 + s, (w - s) // 2:(w - s) // 2 + s]
    interp = cv2.INTER_AREA if crop.shape[0] > size else cv2.INTER_LINEAR
    return cv2.resize(crop, (size, size), interpolation=interp)


def rotate(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Any angle; reflect the border so no black corners teach the model a shortcut."""
    k = int(rng.integers(0, 4))
    img = np.rot90(img, k)
    angle = rng.uniform(-45, 45)
    s = img.shape[0]
    m = cv2.getRotationMatrix2D((s / 2, s / 2), angle, 1.0)
    img = cv2.warpAffine(np.ascontiguousarray(img), m, (s, s), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT_101)
    if rng.random() < 0.5:
        img = img[:, ::-1]
    return img


def color_jitter(img: np.ndarray, rng: np.random.Generator, strength: float = 1.0) -> np.ndarray:
    x = img.astype(np.float32) / 255.0
    x = x * rng.uniform(1 - 0.25 * strength, 1 + 0.25 * strength)                     # brightness
    mean = x.mean()
    x = (x - mean) * rng.uniform(1 - 0.25 * strength, 1 + 0.25 * strength) + mean      # contrast
    x = x * rng.uniform(1 - 0.12 * strength, 1 + 0.12 * strength, size=3)              # white balance
    x = np.clip(x, 0, 1) ** rng.uniform(1 - 0.25 * strength, 1 + 0.25 * strength)      # gamma
    hsv = cv2.cvtColor(x.astype(np.float32), cv2.COLOR_RGB2HSV)
    hsv[..., 0] = (hsv[..., 0] + rng.uniform(-8, 8) * strength) % 360                    # hue (degrees)
    hsv[..., 1] = np.clip(hsv[..., 1] * rng.uniform(1 - 0.3 * strength, 1 + 0.3 * strength), 0, 1)
    x = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)
    return np.clip(x * 255.0, 0, 255).astype(np.uint8)


def degrade(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    if rng.random() < 0.2:
        img = cv2.GaussianBlur(img, (0, 0), rng.uniform(0.3, 1.2))
    if rng.random() < 0.2:
        q = int(rng.integers(40, 90))
        ok, enc = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, q])
        if ok:
            img = cv2.imdecode(enc, cv2.IMREAD_UNCHANGED)
    return img


def augment(img: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """HxWx3 uint8 RGB source -> size x size x 3 uint8 RGB, randomly transformed."""
    out = random_resized_crop(img, size, rng)
    out = rotate(out, rng)
    out = color_jitter(np.ascontiguousarray(out), rng)
    return np.ascontiguousarray(degrade(out, rng))
