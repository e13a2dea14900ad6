"""Pictures that are not dermoscopy, for measuring the out-of-distribution flag.

Made here rather than downloaded (nothing can be downloaded on the build
machines): noise of several kinds, text pages and documents, gradients,
checkerboards and stripes, simple drawings of faces and keyboards, flat
colours, plus scikit-image's sample photographs (astronaut, cat, coffee,
rocket, ...) in random crops when scikit-image is installed. Each category
is varied in colour, scale and layout with a seeded generator, so a set is
reproducible and a few hundred images are not near-copies of each other.
"""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

WORDS = ("patient", "clinic", "lesion", "report", "date", "signature", "dermatology", "referral", "the", "and",
         "keyboard", "invoice", "total", "page", "name", "address", "results", "follow-up", "history", "notes")


def _noise(rng, h, w):
    kind = rng.integers(4)
    if kind == 0:
        return rng.normal(rng.uniform(60, 200), rng.uniform(10, 80), (h, w, 3))
    if kind == 1:
        return rng.uniform(0, 255, (h, w, 3))
    if kind == 2:  # salt and pepper on a flat colour
        im = np.full((h, w, 3), rng.uniform(0, 255, 3))
        m = rng.random((h, w))
        im[m < 0.05], im[m > 0.95] = 0, 255
        return im
    small = rng.uniform(0, 255, (max(2, h // 32), max(2, w // 32), 3)).astype(np.float32)  # blotchy noise
    return cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC)


def _text(rng, h, w, document: bool = False):
    paper = rng.uniform(200, 255, 3)
    im = np.full((h, w, 3), paper, np.uint8)
    ink = tuple(float(x) for x in rng.uniform(0, 90, 3))
    y, scale = int(rng.integers(20, 50)), float(rng.uniform(0.4, 1.0))
    while y < h - 10:
        x = int(rng.integers(5, 30))
        line = " ".join(rng.choice(WORDS, int(rng.integers(3, 9))))
        cv2.putText(im, line, (x, y), int(rng.choice([0, 1, 2, 3, 4, 6])), scale, ink, 1 + int(rng.integers(2)),
                    cv2.LINE_AA)
        y += int(28 * scale + rng.integers(6, 20))
    if document:  # boxes and rules of a form
        for _ in range(int(rng.integers(2, 6))):
            x0, y0 = int(rng.integers(0, w - 40)), int(rng.integers(0, h - 40))
            cv2.rectangle(im, (x0, y0), (x0 + int(rng.integers(30, w // 2)), y0 + int(rng.integers(20, h // 4))),
                          ink, 1)
    return im


def _gradient(rng, h, w):
    a, b = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    if rng.random() < 0.5:
        t = np.linspace(0, 1, w)[None, :, None] if rng.random() < 0.5 else np.linspace(0, 1, h)[:, None, None]
    else:
        yy, xx = np.mgrid[0:h, 0:w]
        t = (np.hypot(yy - h * rng.random(), xx - w * rng.random()) / np.hypot(h, w))[..., None]
    return np.broadcast_to(a + (b - a) * t, (h, w, 3))


def _checker(rng, h, w):
    s = int(rng.integers(4, 64))
    yy, xx = np.mgrid[0:h, 0:w]
    if rng.random() < 0.6:
        m = ((yy // s + xx // s) % 2).astype(bool)
    else:  # stripes
        m = ((xx if rng.random() < 0.5 else yy) // s % 2).astype(bool)
    a, b = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    return np.where(m[..., None], a, b)


def _face(rng, h, w):
    im = np.full((h, w, 3), rng.uniform(150, 255, 3), np.uint8)
    skin = tuple(float(x) for x in (rng.uniform(60, 200), rng.uniform(100, 200), rng.uniform(150, 250)))  # BGR
    cx, cy, r = w // 2 + int(rng.integers(-20, 20)), h // 2 + int(rng.integers(-20, 20)), int(min(h, w) * rng.uniform(0.25, 0.42))
    cv2.ellipse(im, (cx, cy), (r, int(r * 1.25)), 0, 0, 360, skin, -1)
    eye = (float(rng.uniform(0, 80)),) * 3
    for dx in (-r // 3, r // 3):
        cv2.circle(im, (cx + dx, cy - r // 4), max(3, r // 8), (255, 255, 255), -1)
        cv2.circle(im, (cx + dx, cy - r // 4), max(2, r // 16), eye, -1)
    cv2.ellipse(im, (cx, cy + r // 2), (r // 3, r // 8), 0, 0, 180, (40, 40, 160), 3)
    cv2.line(im, (cx, cy - r // 8), (cx - r // 10, cy + r // 6), (60, 80, 120), 2)
    return im


def _keyboard(rng, h, w):
    body = rng.uniform(20, 230, 3)
    im = np.full((h, w, 3), body, np.uint8)
    key = tuple(float(x) for x in np.clip(body + rng.choice([-60, 60]), 0, 255))
    ink = (255.0, 255.0, 255.0) if key[0] < 128 else (0.0, 0.0, 0.0)
    k = int(rng.integers(18, 40))
    letters = "QWERTYUIOPASDFGHJKLZXCVBNM1234567890"
    for row in range(h // (k + 4)):
        for col in range(w // (k + 4)):
            x0, y0 = col * (k + 4) + 3 + (row * k // 3) % k, row * (k + 4) + 3
            if x0 + k >= w:
                continue
            cv2.rectangle(im, (x0, y0), (x0 + k, y0 + k), key, -1)
            cv2.putText(im, letters[(row * 13 + col) % len(letters)], (x0 + k // 4, y0 + 3 * k // 4),
                        0, k / 40, ink, 1, cv2.LINE_AA)
    return im


def _flat(rng, h, w):
    return np.full((h, w, 3), rng.uniform(0, 255, 3)) + rng.normal(0, 2, (h, w, 3))


def _photos() -> list[np.ndarray]:
    try:
        from skimage import data
    except ImportError:
        return []
    out = []
    for name in ("astronaut", "camera", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry",
                 "coins", "page", "text", "moon", "horse", "clock", "logo", "motorcycle_left", "retina", "cat"):
        try:
            im = np.asarray(getattr(data, name)())
        except Exception:  # some sample images need a download (pooch) that cannot happen here
            continue
        if im.dtype == bool:
            im = im.astype(np.uint8) * 255
        if im.ndim == 2:
            im = np.repeat(im[..., None], 3, axis=2)
        out.append(cv2.cvtColor(im[..., :3].astype(np.uint8), cv2.COLOR_RGB2BGR))
    return out


GENERATORS = {"noise": _noise, "text": _text, "document": lambda r, h, w: _text(r, h, w, True), "gradient": _gradient,
              "checkerboard": _checker, "face_drawing": _face, "keyboard_drawing": _keyboard, "flat_colour": _flat}


def make_set(folder: Path, per_kind: int = 30, seed: int = 0, photos_per_image: int = 8) -> dict[str, list[Path]]:
    """Write the pictures as JPEG/PNG files into `folder`; returns {category: paths}."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    out: dict[str, list[Path]] = {}
    for kind, gen in GENERATORS.items():
        for i in range(per_kind):
            h, w = int(rng.integers(200, 700)), int(rng.integers(200, 900))
            im = np.clip(gen(rng, h, w), 0, 255).astype(np.uint8)
            p = folder / f"{kind}_{i:03d}.{'png' if i % 3 == 0 else 'jpg'}"
            cv2.imwrite(str(p), im)
            out.setdefault(kind, []).append(p)
    for k, photo in enumerate(_photos()):
        for i in range(photos_per_image):
            h, w = photo.shape[:2]
            s = rng.uniform(0.4, 1.0)
            ch, cw = max(32, int(h * s)), max(32, int(w * s))
            y, x = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
            p = folder / f"photo{k:02d}_{i:02d}.jpg"
            cv2.imwrite(str(p), photo[y:y + ch, x:x + cw])
            out.setdefault("photo", []).append(p)
    return out
