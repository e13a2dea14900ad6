"""Pack the training sources and ImageNet weights small enough to travel to a lent GPU machine.

The GPU machine has no registry access and its working-tree transfer is capped (64 MiB), so
the images go as WebP (HAM10000 at quality 80, ISIC 2017 resized to 224x224 at quality 85)
and the backbones' ImageNet weights as float16. Labels files are copied unchanged, so
`build_model.data.load_sources` reads the packed folders exactly like the originals and the
lesion-grouped split comes out the same (checked by sweep.py against the split.csv packed here).

    python scripts/pack_for_gpu.py --out .gpu
"""
from __future__ import annotations

import argparse
import shutil
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import cv2

SOURCES = {"ham10000": ("../shared/data/ham10000", None, 80), "isic2017": ("../shared/data/isic2017-train", 224, 85)}


def _one(job: tuple[str, str, int | None, int]) -> int:
    src, dst, size, q = job
    im = cv2.imread(src, cv2.IMREAD_COLOR)
    if size:
        im = cv2.resize(im, (size, size), interpolation=cv2.INTER_AREA)
    ok, enc = cv2.imencode(".webp", im, [cv2.IMWRITE_WEBP_QUALITY, q])
    Path(dst).write_bytes(enc.tobytes())
    return len(enc)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=Path(".gpu"))
    ap.add_argument("--weights", nargs="*", default=["lite0", "lite2"])
    a = ap.parse_args()
    jobs = []
    for name, (root, size, q) in SOURCES.items():
        root = Path(root)
        (a.out / "data" / name / "images").mkdir(parents=True, exist_ok=True)
        shutil.copyfile(root / "labels.csv", a.out / "data" / name / "labels.csv")
        for p in sorted((root / "images").glob("*.jpg")):
            jobs.append((str(p), str(a.out / "data" / name / "images" / (p.stem + ".webp")), size, q))
    with ProcessPoolExecutor() as ex:
        total = sum(ex.map(_one, jobs, chunksize=64))
    print(f"{len(jobs)} images, {total / 2**20:.1f} MiB")
    import torch

    from build_model.model import pretrained_path

    (a.out / "weights").mkdir(parents=True, exist_ok=True)
    for arch in a.weights:
        state = torch.load(pretrained_path(arch), map_location="cpu", weights_only=True)
        torch.save({k: v.half() if v.is_floating_point() else v for k, v in state.items()}, a.out / "weights" / f"{arch}.pth")
    print("weights:", [(p.name, round(p.stat().st_size / 2**20, 1)) for p in (a.out / "weights").iterdir()])


if __name__ == "__main__":
    main()
