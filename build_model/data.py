"""Datasets in three layouts, several sources at once, and a lesion-grouped stratified split.

Every layout becomes the same `Dataset`: image sources, integer labels, a
group per image (the lesion), and the class names. Images of one lesion are
near-duplicates, so a split by image would leak test lesions into training and
inflate every number; splits here are always by group.

Several sources (`--data ham=DIR --data isic2017=DIR`) merge into one Dataset
that remembers each image's source and which classes each source labels at
all: ISIC 2017 has no carcinomas, and the training loss and every evaluation
must know that "not labelled here" is not "absent here". Each source is split
on its own, so every source has its own validation and test images; a source
named by `--holdout-source` is never trained on (split "holdout").
"""
from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from .errors import DataError, DataNotFound

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"}
# MedMNIST's DermaMNIST label order is HAM10000's dx codes in alphabetical order.
DERMAMNIST_LABELS = ["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"]
SPLITS = ("train", "val", "test")
HOLDOUT = "holdout"


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
    source_of: list[str] = field(default_factory=list)            # source name per image
    source_labels: dict[str, list[str]] = field(default_factory=dict)  # classes each source labels
    source_info: dict[str, dict] = field(default_factory=dict)     # path, layout, label map per source

    def __post_init__(self) -> None:
        if not self.source_of:
            name = source_name(self.source, self.layout)
            self.source_of = [name] * len(self.ids)
            present = sorted({self.labels[k] for k in self.y.tolist()}) if len(self.y) else []
            self.source_labels = {name: [l for l in self.labels if l in present] or list(self.labels)}
            self.source_info = {name: {"path": self.source, "layout": self.layout, "label_map": {}}}

    @property
    def sources(self) -> list[str]:
        return list(self.source_labels)

    def source_counts(self, idx: np.ndarray | None = None) -> dict[str, int]:
        src = np.array(self.source_of) if idx is None else np.array(self.source_of)[idx]
        return {name: int((src == name).sum()) for name in self.sources}

    def label_mask(self) -> np.ndarray:
        """Per image, which classes its source labels (n_images x n_classes, bool)."""
        rows = {s: np.isin(self.labels, ls) for s, ls in self.source_labels.items()}
        return np.stack([rows[s] for s in self.source_of]) if self.ids else np.zeros((0, len(self.labels)), bool)

    def __len__(self) -> int:
        return len(self.ids)

    def image(self, i: int, max_side: int | None = None) -> np.ndarray:
        """HxWx3 uint8 RGB."""
        cached = self.extra.get("cache", {}).get(i)
        if cached is not None and (not max_side or min(cached.shape[:2]) <= max_side):
            return cached
        if self.paths[i] is None:
            im = self.arrays[i]
            if im.ndim == 2:
                im = np.repeat(im[..., None], 3, axis=2)
            return np.ascontiguousarray(im)
        bgr = cv2.imread(str(self.paths[i]), cv2.IMREAD_COLOR)
        if bgr is None:
            raise DataError(f"cannot decode {self.paths[i]}: remove or replace the file and rerun")
        if max_side and min(bgr.shape[:2]) > max_side:
            s = max_side / min(bgr.shape[:2])
            bgr = cv2.resize(bgr, None, fx=s, fy=s, interpolation=cv2.INTER_AREA)
        return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)

    def class_counts(self, idx: np.ndarray | None = None) -> dict[str, int]:
        y = self.y if idx is None else self.y[idx]
        return {name: int((y == k).sum()) for k, name in enumerate(self.labels)}


def source_name(path: str | Path, layout: str = "") -> str:
    p = Path(str(path))
    return "ham10000" if layout == "ham10000" and p.name.lower().startswith("ham") else p.stem or p.name


def parse_source(spec: str | Path) -> tuple[str | None, Path]:
    """`NAME=PATH` or a bare `PATH` (the source is then named after the folder)."""
    text = str(spec)
    if "=" in text and not Path(text).exists():
        name, path = text.split("=", 1)
        if not name or not name.replace("-", "").replace("_", "").isalnum():
            raise DataError(f"--data {text!r}: a source name must be letters, digits, '-' or '_' (NAME=PATH)")
        if not path.strip():
            raise DataError(f"--data {text!r}: the path after {name}= is empty; write NAME=PATH")
        return name, Path(path)
    if not text.strip():
        raise DataError("--data '': give a data folder or .npz (NAME=PATH or PATH)")
    return None, Path(text)


def parse_label_maps(specs: list[str] | tuple[str, ...]) -> dict[str, dict[str, str]]:
    """`--label-map isic2017:melanoma=mel,seborrheic_keratosis=bkl` (repeatable) -> {source: {from: to}}."""
    out: dict[str, dict[str, str]] = {}
    for spec in specs:
        if ":" not in spec:
            raise DataError(f"--label-map {spec!r}: write SOURCE:FROM=TO[,FROM=TO...]")
        src, pairs = spec.split(":", 1)
        for pair in filter(None, pairs.split(",")):
            if "=" not in pair:
                raise DataError(f"--label-map {spec!r}: {pair!r} is not FROM=TO")
            a, b = pair.split("=", 1)
            out.setdefault(src, {})[a.strip()] = b.strip()
    return out


def load_sources(specs: list[str | Path], label_maps: dict[str, dict[str, str]] | None = None,
                 labels: list[str] | None = None) -> Dataset:
    """Load every `--data` source and merge them onto one label list.

    The label list is `labels` when given, else the first source's classes. A
    later source's label must be in it after its `--label-map`; one that maps to
    nothing stops the build naming the labels file and the label, because a
    silently dropped or renamed class would corrupt every number downstream.
    """
    label_maps = label_maps or {}
    if len(specs) == 1 and not label_maps and labels is None:
        name, path = parse_source(specs[0])
        ds = load_dataset(path)
        if name:
            ds.source_of = [name] * len(ds)
            ds.source_labels = {name: next(iter(ds.source_labels.values()))}
            ds.source_info = {name: next(iter(ds.source_info.values()))}
        return ds
    parts: list[tuple[str, Dataset]] = []
    for spec in specs:
        name, path = parse_source(spec)
        ds = load_dataset(path)
        name = name or source_name(path, ds.layout)
        if any(name == n for n, _ in parts):
            raise DataError(f"two --data sources are both named {name!r}: name them NAME=PATH")
        parts.append((name, ds))
    unknown = set(label_maps) - {n for n, _ in parts}
    if unknown:
        raise DataError(f"--label-map names source(s) {sorted(unknown)} but the sources are {[n for n, _ in parts]}")
    canon = list(labels) if labels else [label_maps.get(parts[0][0], {}).get(l, l) for l in parts[0][1].labels]
    ids, y, groups, paths, source_of = [], [], [], [], []
    source_labels: dict[str, list[str]] = {}
    info: dict[str, dict] = {}
    seen_ids: set[str] = set()
    for name, ds in parts:
        lmap = label_maps.get(name, {})
        where = Path(ds.source) / "labels.csv" if ds.layout == "ham10000" else Path(ds.source)
        mapped = []
        for l in ds.labels:
            to = lmap.get(l, l)
            if to not in canon:
                raise DataError(f"source {name!r} ({where}): label {l!r} maps to no class of the model {canon}; "
                                 f"map it with --label-map {name}:{l}=<class> or drop those images")
            mapped.append(to)
        present = {mapped[k] for k in set(ds.y.tolist())}
        source_labels[name] = [c for c in canon if c in present]
        info[name] = {"path": str(ds.source), "layout": ds.layout, "label_map": lmap, "images": len(ds)}
        for i in range(len(ds)):
            iid = ds.ids[i] if ds.ids[i] not in seen_ids else f"{name}/{ds.ids[i]}"
            seen_ids.add(iid)
            ids.append(iid); y.append(canon.index(mapped[ds.y[i]])); groups.append(f"{name}/{ds.groups[i]}")
            paths.append(ds.paths[i]); source_of.append(name)
    if any(ds.arrays is not None for _, ds in parts):
        raise DataError("MedMNIST .npz sources cannot be combined with others; use one --data for them")
    return Dataset(canon, ids, np.array(y), groups, paths, source="+".join(n for n, _ in parts), layout="multi",
                   source_of=source_of, source_labels=source_labels, source_info=info)


def split_sources(ds: Dataset, seed: int = 0, holdout: str | None = None) -> np.ndarray:
    """`grouped_split` within each source; every image of the `holdout` source gets "holdout"."""
    if holdout is not None and holdout not in ds.source_labels:
        raise DataError(f"--holdout-source {holdout!r} is not one of the sources {ds.sources}")
    out = np.empty(len(ds), dtype=object)
    src = np.array(ds.source_of)
    for name in ds.sources:
        idx = np.flatnonzero(src == name)
        if name == holdout:
            out[idx] = HOLDOUT
            continue
        sub = Dataset(ds.labels, [ds.ids[i] for i in idx], ds.y[idx], [ds.groups[i] for i in idx],
                      [ds.paths[i] for i in idx], fixed_split=None if ds.fixed_split is None else [ds.fixed_split[i] for i in idx])
        out[idx] = grouped_split(sub, seed=seed)
        check_splittable(name, sub, out[idx])
    return out.astype(str)


MIN_GROUPS = 3  # one lesion each for val and test, at least one to train on


def groups_per_class(ds: Dataset) -> dict[str, tuple[int, int]]:
    """Per class present: (lesions/groups whose majority class it is, images), as `grouped_split` buckets them."""
    by_group: dict[str, list[int]] = {}
    for i, g in enumerate(ds.groups):
        by_group.setdefault(g, []).append(i)
    out: dict[str, tuple[int, int]] = {}
    for k, name in enumerate(ds.labels):
        n_img = int((ds.y == k).sum())
        if n_img:
            n_grp = sum(1 for idx in by_group.values() if np.bincount(ds.y[idx]).argmax() == k)
            out[name] = (n_grp, n_img)
    return out


def check_splittable(source: str, ds: Dataset, split: np.ndarray) -> None:
    """Refuse a source whose classes cannot each reach train, val and test.

    Why: with fewer than MIN_GROUPS lesions a class goes wholly to training, so validation and the
    gate never see it; a tiny data set then "trains" to a meaningless val AUC (0.000 on 12 images)
    and ships. The message names every short class, its counts and what to do.
    """
    if ds.fixed_split is not None:  # a layout's own split (MedMNIST): each class must still reach val and test
        short = {ds.labels[k]: {s: int(((ds.y == k) & (split == s)).sum()) for s in SPLITS}
                 for k in sorted(set(ds.y.tolist()))}
        short = {c: n for c, n in short.items() if min(n.values()) == 0}
        if short:
            raise DataError(f"source {source!r} is too small to split: its own split leaves some classes without "
                            "train, val or test images: " + "; ".join(f"{c} {n}" for c, n in short.items()) +
                            ". Use a data set with every class in every split.")
        return
    counts = groups_per_class(ds)
    short = {c: n for c, n in counts.items() if n[0] < MIN_GROUPS}
    if not counts:
        raise DataError(f"source {source!r} has no images")
    if short:
        raise DataError(
            f"source {source!r} is too small to split: every class needs at least {MIN_GROUPS} lesions (groups) so "
            f"that validation and test get one each and training the rest; too few: "
            + ", ".join(f"{c} {g} lesion{'s' if g != 1 else ''} ({i} image{'s' if i != 1 else ''})" for c, (g, i) in short.items())
            + f". Add images of {'that class' if len(short) == 1 else 'those classes'} "
            f"or leave {'it' if len(short) == 1 else 'them'} out of this source with --drop-small-classes.")


def load_dataset(path: str | Path) -> Dataset:
    """Detect the layout: HAM10000 (labels.csv), MedMNIST (.npz), or class-per-subfolder."""
    path = Path(path)
    if not path.exists():
        raise DataNotFound(f"data path {path} does not exist: pass --data with a HAM10000 folder, a class-per-subfolder folder or a MedMNIST .npz")
    if path.suffix == ".npz":
        return load_medmnist(path)
    if not path.is_dir():
        raise DataError(f"data path {path} is a file, not a data folder or a MedMNIST .npz: pass --data with a HAM10000 "
                        "folder (labels.csv + images/), a class-per-subfolder folder or a .npz")
    if (path / "labels.csv").exists():
        ds = load_ham10000(path)
    else:
        ds = load_folder(path)
    if not len(ds):
        raise DataError(f"data path {path} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))}): see README 'Retraining' for the layouts")
    return ds


def load_ham10000(root: Path) -> Dataset:
    images = root / "images" if (root / "images").is_dir() else root
    rows = list(csv.DictReader(open(root / "labels.csv", newline="")))
    for col in ("image_id", "dx", "lesion_id"):
        if rows and col not in rows[0]:
            raise DataError(f"{root / 'labels.csv'} has no column {col!r}: HAM10000 layout needs image_id, dx, lesion_id")
    labels = sorted({r["dx"] for r in rows})
    ids, y, groups, paths = [], [], [], []
    for r in rows:
        p = images / f"{r['image_id']}.jpg"
        if not p.exists():
            cands = [images / f"{r['image_id']}{s}" for s in IMAGE_SUFFIXES]
            p = next((c for c in cands if c.exists()), None)
            if p is None:
                raise DataNotFound(f"image {r['image_id']} listed in labels.csv is missing from {images}")
        ids.append(r["image_id"]); y.append(labels.index(r["dx"])); groups.append(r["lesion_id"]); paths.append(p)
    return Dataset(labels, ids, np.array(y), groups, paths, source=str(root), layout="ham10000")


def load_folder(root: Path) -> Dataset:
    """root/<class>/<image>; each image its own group unless root/groups.csv (file,group) says otherwise."""
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise DataError(f"{root} has no labels.csv, is no .npz and has no class subfolders: see README 'Retraining' for the layouts")
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
    try:
        z = np.load(path)
        missing = [f"{s}_{k}" for s in SPLITS for k in ("images", "labels") if f"{s}_{k}" not in z.files]
    except (OSError, ValueError) as e:
        raise DataError(f"{path} is not a readable .npz ({e}): pass a MedMNIST .npz") from None
    if missing:
        raise DataError(f"{path} is not a MedMNIST .npz: it has no {', '.join(missing)} arrays")
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
        w.writerow(["image_id", "source", "label", "group", "split"])
        for i in range(len(ds)):
            w.writerow([ds.ids[i], ds.source_of[i], ds.labels[ds.y[i]], ds.groups[i], split[i]])


def read_split(path: Path, ds: Dataset) -> np.ndarray:
    """Reuse a recorded split; refuse one that does not describe this dataset.

    Files written before sources existed have no `source` column and still read.
    """
    rows = {r["image_id"]: r["split"] for r in csv.DictReader(open(path, newline=""))}
    missing = [i for i in ds.ids if i not in rows]
    if missing:
        raise DataError(f"{path} does not cover {len(missing)} images of the dataset (e.g. {missing[:3]}); delete it to make a new split")
    return np.array([rows[i] for i in ds.ids])


def cache_images(ds: Dataset, threads: int = 8) -> None:
    """Decode every image once into memory (OpenCV releases the GIL: threads decode in parallel),
    for a process that trains several models on the same data."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(threads) as ex:
        ims = list(ex.map(ds.image, range(len(ds))))
    ds.extra["cache"] = dict(enumerate(ims))


def load_images(ds: Dataset, idx: np.ndarray, max_side: int | None = None) -> list[np.ndarray]:
    """Decode once into memory; training re-reads every image each epoch."""
    from tqdm import tqdm

    return [ds.image(int(i), max_side) for i in tqdm(idx, desc="decode", unit="img", leave=False)]


def drop_small_classes(ds: Dataset, holdout: str | None = None) -> tuple[Dataset, dict[str, dict[str, tuple[int, int]]]]:
    """Leave out, per source, the images of classes with fewer than MIN_GROUPS lesions (`--drop-small-classes`).

    Why: the explicit alternative to `check_splittable`'s refusal. A class that no source keeps leaves
    the label list (the model gets no output for it). What was dropped is returned and recorded in the
    source's info, so the bundle's manifest says so. A held-out source and a layout's own split are kept.
    """
    if ds.fixed_split is not None:
        return ds, {}
    keep = np.ones(len(ds), bool)
    src = np.array(ds.source_of)
    dropped: dict[str, dict[str, tuple[int, int]]] = {}
    for name in ds.sources:
        if name == holdout:
            continue
        idx = np.flatnonzero(src == name)
        sub = Dataset(ds.labels, [ds.ids[i] for i in idx], ds.y[idx], [ds.groups[i] for i in idx], [ds.paths[i] for i in idx])
        short = {c: n for c, n in groups_per_class(sub).items() if n[0] < MIN_GROUPS}
        if short:
            dropped[name] = short
            keep[idx[np.isin(ds.y[idx], [ds.labels.index(c) for c in short])]] = False
    if not dropped:
        return ds, {}
    kept = np.flatnonzero(keep)
    labels = [l for k, l in enumerate(ds.labels) if (ds.y[kept] == k).any()]
    remap = {ds.labels.index(l): j for j, l in enumerate(labels)}
    source_of = [ds.source_of[i] for i in kept]
    y = np.array([remap[int(ds.y[i])] for i in kept], dtype=int)
    source_labels = {n: [l for l in ls if l in labels and any(s == n and labels[yy] == l for s, yy in zip(source_of, y))]
                     for n, ls in ds.source_labels.items()}
    info = {n: dict(v) | ({"dropped_classes": {c: {"lesions": g, "images": i} for c, (g, i) in dropped[n].items()}}
                          if n in dropped else {}) | {"images": int(sum(s == n for s in source_of))}
            for n, v in ds.source_info.items()}
    return Dataset(labels, [ds.ids[i] for i in kept], y, [ds.groups[i] for i in kept], [ds.paths[i] for i in kept],
                   source=ds.source, layout=ds.layout, source_of=source_of, source_labels=source_labels,
                   source_info=info), dropped
