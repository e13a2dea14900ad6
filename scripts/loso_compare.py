"""Compare training checkpoints out of source, paired: the cheap ablation a CPU can afford.

An ablation step from scratch costs hours on 2 cores, and its interval (+-0.03 melanoma AUC on
ISIC 2017) is wider than the effect of one augmentation family. Continuing one common checkpoint
for a few epochs with and without a change, and scoring every checkpoint on the SAME images with
the SAME bootstrap resamples, measures the change's effect as a paired difference, whose interval
is several times narrower than either AUC's. That is what this script prints.

    python scripts/loso_compare.py --data ham10000=../shared/data/ham10000 \
        --data isic2017=../shared/data/isic2017-train --holdout isic2017 \
        runs/w-loso/best.pt /tmp/ft/base.work/last.pt /tmp/ft/sc.work/last.pt --out /tmp/loso-compare.json

Every checkpoint is scored in FP32 with its own preprocessing (the agent's), on the held-out
source (all of it: never trained on) and on the training sources' test splits. Without
`--holdout` (a model trained on every source) only the test splits are scored. `CKPT@SIZE`
scores a checkpoint at another input size than it was trained at (e.g. `best.pt@224`): the
train/test resolution discrepancy of random-resized-crop training makes that worth measuring;
`CKPT#lesion_crop` (or `#lesion_crop=0.3`, a margin) scores it on the square around the lesion;
`'A|B'` scores the mean of A's and B's logits (two views of each image, e.g. `'CKPT|CKPT#lesion_crop'`). Differences are
against the SECOND checkpoint when there are three or more (the first is usually the common
starting point), else against the first.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from build_model.data import load_sources, split_sources  # noqa: E402
from build_model.evaluate import auc  # noqa: E402
from build_model.metrics import summarize_restricted  # noqa: E402
from edge_agent.calibration_math import bootstrap_ci, softmax  # noqa: E402


def load_checkpoint(spec: str):
    """`PATH`, `PATH@SIZE` (the same weights, scored at SIZE px), `PATH#RULE` or `PATH#lesion_crop=MARGIN`
    (scored with another resize rule), or both (`PATH@288#lesion_crop`)."""
    from build_model.export import load_checkpoint as load
    from edge_agent.preprocess import Preprocessing

    spec, _, rule = spec.partition("#") if "#" in Path(spec).name else (spec, "", "")
    path, _, size = spec.rpartition("@") if "@" in Path(spec).name else (spec, "", "")
    model, state = load(Path(path), int(size) if size else None)
    over: dict = {"input_size": int(size)} if size else {}
    if rule:
        name, _, margin = rule.partition("=")
        over.update(resize=name, **({"lesion_margin": float(margin)} if margin else {}))
    pre = Preprocessing.from_dict({**state["preprocessing"], **over})
    return model, pre, state["labels"]


def mel_auc(y: np.ndarray, p_mel: np.ndarray, mel: int) -> float:
    """`evaluate`'s rank AUC (NaN for a resample without melanoma or without anything else)."""
    return auc(y == mel, p_mel)


def main(argv: list[str] | None = None) -> dict:
    import torch

    from build_model.train import predict_logits

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("checkpoints", nargs="+")
    ap.add_argument("--data", action="append", required=True, help="NAME=PATH, repeatable (same as build-model)")
    ap.add_argument("--holdout", help="the source the checkpoints were not trained on (none: every source's test split)")
    ap.add_argument("--seed", type=int, default=0, help="the split seed the checkpoints were trained with")
    ap.add_argument("--reps", type=int, default=1000, help="bootstrap resamples")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reference", help="the checkpoint the differences are taken against (default: see above)")
    ap.add_argument("--out", type=Path)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)

    ds = load_sources(a.data)
    split = split_sources(ds, seed=a.seed, holdout=a.holdout)
    src = np.array(ds.source_of)
    sets = {f"{a.holdout} (all, held out)": np.flatnonzero(split == "holdout")} if a.holdout else {}
    for name in ds.sources:
        if name != a.holdout:
            sets[f"{name} test"] = np.flatnonzero((src == name) & (split == "test"))
    idx = np.concatenate(list(sets.values()))
    images = [ds.image(int(i)) for i in idx]
    mel = ds.labels.index("mel")

    logits: dict[str, np.ndarray] = {}
    probs: dict[str, np.ndarray] = {}
    for ck in a.checkpoints:
        for part in ck.split("|"):
            if part not in logits:
                model, pre, labels = load_checkpoint(part)
                if labels != ds.labels:
                    raise SystemExit(f"{part}: labels {labels} differ from the data's {ds.labels}")
                logits[part] = predict_logits(model, images, pre, batch=32)
        probs[ck] = softmax(np.mean([logits[part] for part in ck.split("|")], axis=0))
        print(f"scored {ck}", file=sys.stderr, flush=True)

    ref = a.reference or (a.checkpoints[1] if len(a.checkpoints) >= 3 else a.checkpoints[0])
    if ref not in probs:
        raise SystemExit(f"--reference {ref} is not one of the checkpoints")
    report: dict = {"holdout": a.holdout, "reference": ref, "sets": {}}
    pos = 0
    for set_name, rows in sets.items():
        sl = slice(pos, pos + len(rows))
        pos += len(rows)
        y = ds.y[rows]
        allowed = ds.source_labels[str(src[rows[0]])]
        out = {}
        for ck, p in probs.items():
            p = p[sl]
            r = summarize_restricted(y, p, ds.labels, allowed)
            lo, hi = bootstrap_ci(lambda i: mel_auc(y[i], p[i, mel], mel), len(y), a.reps)
            d = {"mel_auc": r["mel_auc"], "mel_auc_ci": [lo, hi], "balanced_accuracy": r["balanced_accuracy"],
                 "macro_auc": r["macro_auc"]}
            if ck != ref:
                q = probs[ref][sl]
                diff = lambda i: mel_auc(y[i], p[i, mel], mel) - mel_auc(y[i], q[i, mel], mel)  # noqa: E731
                d["mel_auc_minus_ref"] = diff(np.arange(len(y)))
                d["mel_auc_minus_ref_ci"] = list(bootstrap_ci(diff, len(y), a.reps))
            out[ck] = d
        report["sets"][set_name] = out

    print(markdown(report))
    if a.out:
        a.out.write_text(json.dumps(report, indent=2))
    return report


def markdown(report: dict) -> str:
    lines = [f"Paired differences are against `{report['reference']}`, on the same bootstrap resamples.", "",
             "| set | checkpoint | melanoma AUC [95% CI] | difference to reference [95% CI] | balanced accuracy | macro AUC |",
             "|---|---|---|---|---|---|"]
    for set_name, rows in report["sets"].items():
        for ck, d in rows.items():
            lo, hi = d["mel_auc_ci"]
            diff = "reference"
            if "mel_auc_minus_ref" in d:
                dlo, dhi = d["mel_auc_minus_ref_ci"]
                diff = f"{d['mel_auc_minus_ref']:+.3f} [{dlo:+.3f}, {dhi:+.3f}]"
            lines.append(f"| {set_name} | `{ck.replace('|', ' + ')}` | {d['mel_auc']:.3f} [{lo:.3f}, {hi:.3f}] | {diff} | "
                         f"{d['balanced_accuracy']:.3f} | {d['macro_auc']:.3f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
