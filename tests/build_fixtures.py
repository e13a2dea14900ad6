"""Small generated datasets in the three layouts build_model reads (no ../shared needed)."""
from __future__ import annotations

import csv
from pathlib import Path

import cv2
import numpy as np

LABELS = ["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"]


def lesion_image(k: int, rng: np.random.Generator, size: tuple[int, int] = (80, 60)) -> np.ndarray:
    """A skin-coloured BGR image with a blob whose colour and size depend on the class."""
    w, h = size
    img = np.full((h, w, 3), (150, 170, 210), np.uint8)
    img = (img + rng.normal(0, 6, img.shape)).clip(0, 255).astype(np.uint8)
    hue = int(180 * k / len(LABELS))
    colour = cv2.cvtColor(np.uint8([[[hue, 200, 120]]]), cv2.COLOR_HSV2BGR)[0, 0].tolist()
    r = int(8 + 2 * k + rng.integers(0, 4))
    c = (int(w / 2 + rng.integers(-6, 7)), int(h / 2 + rng.integers(-6, 7)))
    cv2.circle(img, c, r, colour, -1)
    return img


def model_inputs(n: int, seed: int, size: int) -> np.ndarray:
    """n lesion-like pictures as a float32 NCHW batch, normalised like the model's input."""
    rng = np.random.default_rng(seed)
    out = [np.asarray(lesion_image(i % 7, rng, (size, size)), np.float32)[..., ::-1].transpose(2, 0, 1)
           for i in range(n)]
    return ((np.stack(out) - 127.0) / 128.0).astype(np.float32)


def make_ham(root: Path, lesions_per_class: int = 4, images_per_lesion: int = 2, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    n = 0
    for k, dx in enumerate(LABELS):
        for lesion in range(lesions_per_class):
            lid = f"HAM_{k}{lesion:04d}"
            for _ in range(images_per_lesion):
                iid = f"ISIC_{n:07d}"
                cv2.imwrite(str(root / "images" / f"{iid}.jpg"), lesion_image(k, rng))
                rows.append({"image_id": iid, "dx": dx, "lesion_id": lid, "dx_type": "histo", "age": "50",
                             "sex": "female", "localization": "back"})
                n += 1
    with open(root / "labels.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return root


def make_folder(root: Path, per_class: int = 4, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    for k, name in enumerate(LABELS[:3]):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            cv2.imwrite(str(root / name / f"{i}.png"), lesion_image(k, rng))
    return root


def make_npz(path: Path, per_split: int = 14, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    data = {}
    for s in ("train", "val", "test"):
        ys = np.arange(per_split) % len(LABELS)
        data[f"{s}_images"] = np.stack([cv2.cvtColor(lesion_image(int(k), rng, (28, 28)), cv2.COLOR_BGR2RGB) for k in ys])
        data[f"{s}_labels"] = ys.reshape(-1, 1)
    np.savez(path, **data)
    return path


def make_isic_like(root: Path, lesions_per_class: int = 6, seed: int = 5, classes: tuple[str, ...] = ("bkl", "mel", "nv"),
                   rename: dict[str, str] | None = None) -> Path:
    """A second source in the HAM10000 layout that labels only some classes (like ISIC 2017), square images;
    `rename` writes other label names (e.g. melanoma for mel) to exercise --label-map."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for k, dx in enumerate(LABELS):
        if dx not in classes:
            continue
        for lesion in range(lesions_per_class):
            iid = f"ISIC17_{k}{lesion:04d}"
            cv2.imwrite(str(root / "images" / f"{iid}.jpg"), lesion_image(k, rng, (64, 64)))
            rows.append({"image_id": iid, "dx": (rename or {}).get(dx, dx), "lesion_id": iid, "age": "40", "sex": "male"})
    with open(root / "labels.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return root
