"""Datasets in three layouts, and a lesion-grouped stratified split.

Every layout becomes the same `Dataset`: image sources, integer labels, a
group per image (the lesion), and the class names. Images of one lesion are
near-duplicates, so a split by image would leak test lesions into training and
inflate every number; splits here are always by group.
"""
from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"}
# MedMNIST's DermaMNIST label order is HAM10000's dx codes in alphabetical order.
DERMAMNIST_LABELS = ["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"]
SPLITS = ("train", "val", "test")


@dataclass
class Dataset:
    labels: list[str]
    ids: list[str]                  # stable image identifiers (written to split.csv)
    y: np.ndarray                   # int label per image
    groups: list[str]               # lesion id per image
    paths: list[Path | None]        # file per image, or None when pixels come from `arrays`
    arrays: np.ndarray | None = None
    fixed_split: list[str] | None = None  # a layout's own split (MedMNIST), kept as is
    source: str = ""
    layout: str = ""
    extra: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.ids)

    def image(self, i: int, max_side: int | None = None) -> np.ndarray:
        """HxWx3 uint8 RGB."""
        if self.paths[i] is None:
            im = self.arrays[i]
            if im.ndim == 2:
                im = np.repeat(im[..., None], 3, axis=2)
            return np.ascontiguousarray(im)
        bgr = cv2.imread(str(self.paths[i]), cv2.IMREAD_COLOR)
        if bgr is None:
            raise ValueError(f"cannot decode {self.paths[i]}: remove or replace the file and rerun")
        if max_side and min(bgr.shape[:2]) > max_side:
            s = max_side / min(bgr.shape[:2])
            bgr = cv2.resize(bgr, None, fx=s, fy=s, interpolation=cv2.INTER_AREA)
        return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)

    def class_counts(self, idx: np.ndarray | None = None) -> dict[str, int]:
        y = self.y if idx is None else self.y[idx]
        return {name: int((y == k).sum()) for k, name in enumerate(self.labels)}


def load_dataset(path: str | Path) -> Dataset:
    """Detect the layout: HAM10000 (labels.csv), MedMNIST (.npz), or class-per-subfolder."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"data path {path} does not exist: pass --data with a HAM10000 folder, a class-per-subfolder folder or a MedMNIST .npz")
    if path.suffix == ".npz":
        return load_medmnist(path)
    if (path / "labels.csv").exists():
        return load_ham10000(path)
    return load_folder(path)


def load_ham10000(root: Path) -> Dataset:
    images = root / "images" if (root / "images").is_dir() else root
    rows = list(csv.DictReader(open(root / "labels.csv", newline="")))
    for col in ("image_id", "dx", "lesion_id"):
        if rows and col not in rows[0]:
            raise ValueError(f"{root / 'labels.csv'} has no column {col!r}: HAM10000 layout needs image_id, dx, lesion_id")
    labels = sorted({r["dx"] for r in rows})
    ids, y, groups, paths = [], [], [], []
    for r in rows:
        p = images / f"{r['image_id']}.jpg"
        if not p.exists():
            cands = [images / f"{r['image_id']}{s}" for s in IMAGE_SUFFIXES]
            p = next((c for c in cands if c.exists()), None)
            if p is None:
                raise FileNotFoundError(f"image {r['image_id']} listed in labels.csv is missing from {images}")
        ids.append(r["image_id"]); y.append(labels.index(r["dx"])); groups.append(r["lesion_id"]); paths.append(p)
    return Dataset(labels, ids, np.array(y), groups, paths, source=str(root), layout="ham10000")


def load_folder(root: Path) -> Dataset:
    """root/<class>/<image>; each image its own group unless root/groups.csv (file,group) says otherwise."""
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise ValueError(f"{root} has no labels.csv, is no .npz and has no class subfolders: see README 'Retraining' for the layouts")
    group_of: dict[str, str] = {}
    if (root / "groups.csv").exists():
        group_of = {r["file"]: r["group"] for r in csv.DictReader(open(root / "groups.csv", newline=""))}
    ids, y, groups, paths = [], [], [], []
    for k, c in enumerate(classes):
        for p in sorted((root / c).rglob("*")):
            if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith("."):
                rel = str(p.relative_to(root))
                ids.append(rel); y.append(k); paths.append(p); groups.append(group_of.get(rel, rel))
    return Dataset(classes, ids, np.array(y), groups, paths, source=str(root), layout="folder")


def load_medmnist(path: Path) -> Dataset:
    """A MedMNIST .npz (train/val/test_images and _labels); its own split is kept (it has no lesion ids)."""
    z = np.load(path)
    arrays, y, split = [], [], []
    for s in SPLITS:
        arrays.append(z[f"{s}_images"]); y.append(z[f"{s}_labels"].reshape(-1)); split += [s] * len(y[-1])
    arr = np.concatenate(arrays)
    yy = np.concatenate(y).astype(int)
    n_cls = int(yy.max()) + 1
    labels = DERMAMNIST_LABELS if n_cls == 7 and "derma" in path.name.lower() else [f"class_{k}" for k in range(n_cls)]
    ids = [f"{s}_{i}" for i, s in enumerate(split)]
    return Dataset(labels, ids, yy, ids, [None] * len(ids), arrays=arr, fixed_split=split,
                   source=str(path), layout="medmnist")


def grouped_split(ds: Dataset, fractions: tuple[float, float, float] = (0.7, 0.15, 0.15),
                  seed: int = 0) -> np.ndarray:
    """Assign every image to train/val/test, whole groups at a time, stratified by class.

    Groups are bucketed by their (majority) class and each bucket is shuffled
    with `seed` and cut by `fractions`, so rare classes appear in every split.
    """
    if ds.fixed_split is not None:
        return np.array(ds.fixed_split)
    by_group: dict[str, list[int]] = {}
    for i, g in enumerate(ds.groups):
        by_group.setdefault(g, []).append(i)
    rng = np.random.default_rng(seed)
    out = np.empty(len(ds), dtype=object)
    for k in range(len(ds.labels)):
        gs = sorted(g for g, idx in by_group.items() if np.bincount(ds.y[idx]).argmax() == k)
        rng.shuffle(gs)
        n = len(gs)
        n_val = max(1, round(n * fractions[1])) if n >= 3 else 0
        n_test = max(1, round(n * fractions[2])) if n >= 3 else 0
        for j, g in enumerate(gs):
            s = "test" if j < n_test else "val" if j < n_test + n_val else "train"
            for i in by_group[g]:
                out[i] = s
    return out.astype(str)


def write_split(path: Path, ds: Dataset, split: np.ndarray) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image_id", "label", "group", "split"])
        for i in range(len(ds)):
            w.writerow([ds.ids[i], ds.labels[ds.y[i]], ds.groups[i], split[i]])


def read_split(path: Path, ds: Dataset) -> np.ndarray:
    """Reuse a recorded split; refuse one that does not describe this dataset."""
    rows = {r["image_id"]: r["split"] for r in csv.DictReader(open(path, newline=""))}
    missing = [i for i in ds.ids if i not in rows]
    if missing:
        raise ValueError(f"{path} does not cover {len(missing)} images of the dataset (e.g. {missing[:3]}); delete it to make a new split")
    return np.array([rows[i] for i in ds.ids])


def load_images(ds: Dataset, idx: np.ndarray, max_side: int | None = None) -> list[np.ndarray]:
    """Decode once into memory; training re-reads every image each epoch."""
    from tqdm import tqdm

    return [ds.image(int(i), max_side) for i in tqdm(idx, desc="decode", unit="img", leave=False)]
