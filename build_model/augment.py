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

from dataclasses import dataclass

import cv2
import numpy as np
from .errors import ConfigError


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


# --- Out-of-source augmentations (issue: a model that holds up in other clinics) -------------
#
# What differs between HAM10000 and other clinics' dermoscopy, drawn onto training images so the
# model cannot use it as a shortcut: the dermatoscope's dark circular field and vignetting,
# hair, rulers and ink marks, how much of the frame the lesion fills, anisotropic resizing
# (ISIC 2017 was squeezed to 256x256), lamps, white balance, sensor noise and compression.

@dataclass(frozen=True)
class AugmentConfig:
    """Which augmentation families are on; each can be ablated on its own."""

    artefacts: bool = False     # vignette / black circular field, hair, ruler, ink marks
    zoom: bool = False          # lesion small in a large field (zoom out) and tighter crops (zoom in)
    aspect: bool = False        # anisotropic squeeze and stretch, as when a 4:3 photo is resized to a square
    strong_color: bool = False  # wider illumination, white balance, gamma, saturation; noise, blur, JPEG
    wide_field: bool = False    # lesion and its texture smaller than HAM10000 shows them: more zoom out, fewer zoom-in crops

    @classmethod
    def from_names(cls, names: str | list[str]) -> "AugmentConfig":
        items = [n.strip() for n in (names.split(",") if isinstance(names, str) else names) if n.strip()]
        unknown = [n for n in items if n not in cls.__dataclass_fields__]
        if unknown:
            raise ConfigError(f"unknown augmentation {unknown}: choose from {sorted(cls.__dataclass_fields__)}")
        return cls(**{n: True for n in items})

    def names(self) -> list[str]:
        return [k for k in self.__dataclass_fields__ if getattr(self, k)]


_GRIDS: dict[tuple[int, int], np.ndarray] = {}


def _radius_grid(h: int, w: int) -> np.ndarray:
    """Distance of every pixel from the image centre (cached per size: augmentation is hot)."""
    g = _GRIDS.get((h, w))
    if g is None:
        yy, xx = np.mgrid[:h, :w].astype(np.float32)
        g = _GRIDS[(h, w)] = np.sqrt((yy - (h - 1) / 2) ** 2 + (xx - (w - 1) / 2) ** 2)
    return g


def _blend_to(img: np.ndarray, alpha: np.ndarray, floor: float) -> np.ndarray:
    """img * alpha + floor * (1 - alpha), per pixel, in float32 with OpenCV."""
    a3 = cv2.merge([alpha, alpha, alpha])
    out = cv2.multiply(img.astype(np.float32) - floor, a3) + floor
    return np.clip(out, 0, 255).astype(np.uint8)


def circular_field(img: np.ndarray, rng: np.random.Generator, radius: float | None = None) -> np.ndarray:
    """A dermatoscope's dark round field: black outside a centred circle (soft edge) of at least 0.45 side.

    The middle (where the lesion is) keeps every pixel: only pixels farther than the radius
    (at least 0.45 of the shorter side) from the centre change.
    """
    h, w = img.shape[:2]
    s = min(h, w)
    r = (radius if radius is not None else rng.uniform(0.45, 0.72)) * s
    edge = max(1.0, rng.uniform(0.005, 0.04) * s)
    alpha = np.clip((r - _radius_grid(h, w)) / edge, 0, 1)
    return _blend_to(img, alpha, rng.uniform(0, 25))


def vignette(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Radial fall-off of illumination (corners darker); the central disc (0.35 of the half-diagonal) unchanged."""
    h, w = img.shape[:2]
    d = _radius_grid(h, w) / np.float32(np.hypot(h / 2, w / 2))
    strength = np.float32(rng.uniform(0.2, 0.7))
    gain = 1 - strength * np.clip((d - 0.35) / 0.65, 0, 1) ** 2
    return _blend_to(img, gain.astype(np.float32), 0.0)


def hair(img: np.ndarray, rng: np.random.Generator, n: int | None = None) -> np.ndarray:
    """Dark thin curved strands across the image."""
    out = img.copy()
    h, w = img.shape[:2]
    n = int(rng.integers(3, 25)) if n is None else n
    base = rng.uniform(10, 70)
    for _ in range(n):
        p0 = rng.uniform(0, 1, 2) * (w, h)
        ang = rng.uniform(0, 2 * np.pi)
        length = rng.uniform(0.2, 0.9) * max(h, w)
        bend = rng.uniform(-0.5, 0.5)
        t = np.linspace(0, 1, 12)
        a = ang + bend * t * np.pi
        pts = p0 + np.cumsum(np.stack([np.cos(a), np.sin(a)], 1) * length / 12, axis=0)
        c = base * rng.uniform(0.6, 1.2)
        col = (float(c * 1.1), float(c * 0.9), float(c * 0.7))
        cv2.polylines(out, [pts.astype(np.int32)], False, col, int(rng.integers(1, 3)), cv2.LINE_AA)
    return out


def ruler(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A ruler along one border: a light band with dark millimetre ticks."""
    out = img.copy()
    h, w = img.shape[:2]
    band = max(4, int(rng.uniform(0.05, 0.12) * min(h, w)))
    side = int(rng.integers(0, 4))
    light = rng.uniform(170, 250)
    tint = rng.uniform(0.85, 1.0, 3)
    strip = np.full((band, max(h, w), 3), light, np.float32) * tint
    step = max(3, int(rng.uniform(0.02, 0.05) * max(h, w)))
    for i, x in enumerate(range(0, strip.shape[1], step)):
        tick = band if i % 5 == 0 else band // 2
        strip[:tick, x:x + 1] = rng.uniform(0, 60)
    strip = strip.astype(np.uint8)
    if side == 0:
        out[:band, :] = strip[:, :w]
    elif side == 1:
        out[h - band:, :] = strip[::-1, :w]
    elif side == 2:
        out[:, :band] = strip[:, :h].transpose(1, 0, 2)
    else:
        out[:, w - band:] = strip[::-1, :h].transpose(1, 0, 2)
    return out


def ink(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Surgical-marker ink (gentian violet): translucent purple strokes or dots away from the centre."""
    layer = img.copy()
    h, w = img.shape[:2]
    col = tuple(float(v) for v in (rng.uniform(60, 130), rng.uniform(20, 70), rng.uniform(110, 190)))
    for _ in range(int(rng.integers(1, 4))):
        ang = rng.uniform(0, 2 * np.pi)
        r = rng.uniform(0.3, 0.48) * min(h, w)
        c = (int(w / 2 + r * np.cos(ang)), int(h / 2 + r * np.sin(ang)))
        if rng.random() < 0.5:
            cv2.circle(layer, c, int(rng.integers(2, 6)), col, -1, cv2.LINE_AA)
        else:
            d = rng.uniform(-1, 1, 2) * 0.15 * min(h, w)
            cv2.line(layer, c, (int(c[0] + d[0]), int(c[1] + d[1])), col, int(rng.integers(2, 5)), cv2.LINE_AA)
    a = rng.uniform(0.5, 0.9)
    return cv2.addWeighted(layer, a, img, 1 - a, 0)


def zoom_out(img: np.ndarray, rng: np.random.Generator, factor: tuple[float, float] = (0.55, 0.9),
             fill: str = "reflect") -> np.ndarray:
    """The lesion smaller in a larger field: shrink and surround with skin.

    `reflect` mirrors the shrunk frame outwards, so a lesion that reaches the border reappears as
    partial copies around it (kept as it is: the `zoom` family and the shipped bundle's recipe use
    it); `skin` fills the surround with the frame's border colour and grain, one lesion only."""
    h, w = img.shape[:2]
    f = rng.uniform(*factor)
    small = cv2.resize(img, (max(8, int(w * f)), max(8, int(h * f))), interpolation=cv2.INTER_AREA)
    sh, sw = small.shape[:2]
    top, left = (h - sh) // 2, (w - sw) // 2
    if fill == "reflect":
        return cv2.copyMakeBorder(small, top, h - sh - top, left, w - sw - left, cv2.BORDER_REFLECT_101)
    if fill == "skin":
        return _paste_on_skin(img, small, top, left, rng)
    raise ValueError(f"zoom_out fill {fill!r}: use 'reflect' or 'skin'")


def _paste_on_skin(img: np.ndarray, small: np.ndarray, top: int, left: int, rng: np.random.Generator) -> np.ndarray:
    h, w = img.shape[:2]
    b = max(2, int(0.08 * min(h, w)))
    ring = np.concatenate([img[:b].reshape(-1, 3), img[-b:].reshape(-1, 3),
                           img[:, :b].reshape(-1, 3), img[:, -b:].reshape(-1, 3)]).astype(np.float32)
    colour, grain = np.median(ring, axis=0), np.minimum(ring.std(axis=0), 20.0)
    bg = colour + rng.normal(0.0, 1.0, (h, w, 3)).astype(np.float32) * grain
    bg = cv2.GaussianBlur(bg, (0, 0), 1.5)
    sh, sw = small.shape[:2]
    alpha = np.zeros((h, w), np.float32)
    alpha[top:top + sh, left:left + sw] = 1.0
    alpha = cv2.GaussianBlur(alpha, (0, 0), max(1.0, 0.03 * min(sh, sw)))[..., None]
    alpha[top + 2:top + sh - 2, left + 2:left + sw - 2] = 1.0  # the shrunk frame itself stays exact
    canvas = bg.copy()
    canvas[top:top + sh, left:left + sw] = small
    return np.clip(alpha * canvas + (1 - alpha) * bg, 0, 255).astype(np.uint8)


def squeeze(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Resize one axis only: a 4:3 or 3:2 photo squeezed to a square, or the other way round."""
    h, w = img.shape[:2]
    r = float(np.exp(rng.uniform(np.log(0.62), np.log(1.6))))
    return cv2.resize(img, (max(8, int(round(w * r))), h), interpolation=cv2.INTER_AREA if r < 1 else cv2.INTER_LINEAR)


def color_jitter_lut(img: np.ndarray, rng: np.random.Generator, strength: float = 1.0) -> np.ndarray:
    """`color_jitter`'s changes at a tenth of its cost: brightness, contrast, white balance and gamma
    are pointwise per channel, so they run as one 256-entry table per channel; hue and saturation
    on OpenCV's 8-bit HSV."""
    levels = np.arange(256, dtype=np.float32) / 255.0
    b = rng.uniform(1 - 0.25 * strength, 1 + 0.25 * strength)
    c = rng.uniform(1 - 0.25 * strength, 1 + 0.25 * strength)
    gains = rng.uniform(1 - 0.12 * strength, 1 + 0.12 * strength, size=3)
    g = rng.uniform(1 - 0.25 * strength, 1 + 0.25 * strength)
    mean = float(img.mean()) / 255.0 * b
    planes = []
    for ch in range(3):
        x = ((levels * b - mean) * c + mean) * gains[ch]
        lut = (np.clip(x, 0, 1) ** g * 255.0).round().astype(np.uint8)
        planes.append(cv2.LUT(img[..., ch], lut))
    out = cv2.merge(planes)
    hsv = cv2.cvtColor(out, cv2.COLOR_RGB2HSV)
    hue = int(round(rng.uniform(-8, 8) * strength / 2))  # OpenCV's 8-bit hue is degrees / 2
    sat = rng.uniform(1 - 0.3 * strength, 1 + 0.3 * strength)
    hsv[..., 0] = ((hsv[..., 0].astype(np.int16) + hue) % 180).astype(np.uint8)
    hsv[..., 1] = cv2.LUT(hsv[..., 1], np.clip(np.arange(256) * sat, 0, 255).astype(np.uint8))
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)


def sensor_noise(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    noise = np.empty(img.shape, np.int16)
    cv2.setRNGSeed(int(rng.integers(0, 2**31 - 1)))
    cv2.randn(noise, 0, float(rng.uniform(2, 10)))
    return cv2.add(img, noise, dtype=cv2.CV_8U)


def strong_color(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Wider lamp/white-balance/gamma/saturation changes, then sensor noise."""
    out = color_jitter_lut(img, rng, strength=1.5)
    if rng.random() < 0.4:
        out = sensor_noise(out, rng)
    return out


def degrade_strong(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    if rng.random() < 0.3:
        img = cv2.GaussianBlur(img, (0, 0), rng.uniform(0.3, 2.0))
    if rng.random() < 0.35:
        ok, enc = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, int(rng.integers(25, 90))])
        if ok:
            img = cv2.imdecode(enc, cv2.IMREAD_UNCHANGED)
    return img


def augment_v2(img: np.ndarray, size: int, rng: np.random.Generator, cfg: AugmentConfig) -> np.ndarray:
    """`augment` with the out-of-source families of `cfg` switched on; with none on it equals `augment`'s recipe."""
    src = img
    if cfg.aspect and rng.random() < 0.6:
        src = squeeze(src, rng)
    if cfg.wide_field and rng.random() < 0.5:
        # Other dermatoscopes' wider fields and high-resolution originals squeezed to 256 px show
        # a lesion's structures smaller per pixel than HAM10000 at the same input size (scoring the
        # HAM-only model at 288 px instead of 192 raised its ISIC 2017 melanoma AUC by 0.05), while
        # random resized crops mostly magnify: this family shifts training towards the smaller scale.
        src = zoom_out(src, rng, (0.4, 0.8), fill="skin")
    elif cfg.zoom and rng.random() < 0.35:
        src = zoom_out(src, rng)
    scale = (0.55, 1.0) if cfg.wide_field else (0.25, 1.0) if cfg.zoom else (0.45, 1.0)
    ratio = (0.6, 1.67) if cfg.aspect else (0.8, 1.25)
    out = random_resized_crop(src, size, rng, scale=scale, ratio=ratio)
    out = np.ascontiguousarray(rotate(out, rng))
    if cfg.artefacts:
        if rng.random() < 0.3:
            out = hair(out, rng)
        if rng.random() < 0.15:
            out = ink(out, rng)
        if rng.random() < 0.15:
            out = ruler(out, rng)
    out = strong_color(out, rng) if cfg.strong_color else color_jitter_lut(out, rng)
    if cfg.artefacts:
        if rng.random() < 0.25:
            out = vignette(out, rng)
        if rng.random() < 0.25:
            out = circular_field(out, rng)
    out = degrade_strong(out, rng) if cfg.strong_color else degrade(out, rng)
    return np.ascontiguousarray(out)
