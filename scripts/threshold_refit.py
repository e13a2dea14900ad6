#!/usr/bin/env python3
"""What a bundle's review flags would be with temperature and thresholds re-fitted for how it screens.

    python scripts/threshold_refit.py --data ham10000=../shared/data/ham10000 \
        --data isic2017=../shared/data/isic2017-train --split BUNDLE/split.csv BUNDLE [BUNDLE ...]

For each bundle: its primary variant's probabilities on the validation and test images of `--split`,
exactly as the agent computes them (build_model.evaluate.screen_images: decoder, preprocessing with
its views, TTA), then the build's own arithmetic (`build-model validate`'s finalize): temperature on
validation, the 95%-sensitivity thresholds with the lowest-of-pooled-and-per-source rule, applied to
the test images. Why: a bundle made by editing another's screening (e.g. adding `views` to a copy of
the manifest) keeps thresholds fitted for the old arithmetic; this says what its own would give,
without the training checkpoint `validate` needs. Logits are recovered as T * log(p), which differs
from the bundle's logits by a constant per image - nothing softmax, temperature or thresholds see.
Unsigned bundles need EDGE_AGENT_ALLOW_UNSIGNED_BUNDLE=true.
"""
from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from build_model.calibrate import apply_thresholds, choose_thresholds, fit_temperature  # noqa: E402
from build_model.data import load_sources  # noqa: E402
from build_model.evaluate import evaluate_source, screen_images  # noqa: E402
from build_model.metrics import softmax  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("bundles", nargs="+", type=Path)
    ap.add_argument("--data", action="append", required=True, help="NAME=PATH (repeatable), as for build-model")
    ap.add_argument("--split", type=Path, required=True, help="the split.csv whose val and test images to use")
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    ds = load_sources(a.data)
    rows = {(r.get("source") or "", r["image_id"]): r["split"] for r in csv.DictReader(open(a.split, newline=""))}
    part = np.array([rows.get((ds.source_of[i], ds.ids[i]), "") for i in range(len(ds))])
    va, te = np.flatnonzero(part == "val"), np.flatnonzero(part == "test")
    for b in a.bundles:
        logits = {}
        for name, idx in (("val", va), ("test", te)):
            bundle, variant, probs, refused = screen_images(b, [ds.paths[i] for i in idx], a.threads)
            if refused:
                raise SystemExit(f"{b}: the decoder refused {len(refused)} {name} images; this needs all of them")
            logits[name] = bundle.temperature * np.log(np.clip(np.stack(probs), 1e-12, 1))
        labels = list(bundle.labels)
        yv, yt = (np.array([labels.index(ds.labels[ds.y[i]]) for i in idx]) for idx in (va, te))
        t = fit_temperature(logits["val"], yv)
        th = choose_thresholds(softmax(logits["val"], t), yv, labels, [k for k in ("mel", "bcc", "akiec") if k in labels],
                               sources=[ds.source_of[i] for i in va])
        pt = softmax(logits["test"], t)
        apply_thresholds(th, pt, yt, labels, "test", sources=[ds.source_of[i] for i in te])
        print(f"\n{b} ({bundle.model_id}, {variant}): T = {t:.3f}, thresholds "
              + ", ".join(f"{k} {v['probability']:.4f}" for k, v in th.items() if "labels" in v))
        print("| source | test images | mel AUC | BA | melanoma flag sens / spec | malignant flag sens | "
              "benign unflagged [95% CI] |\n|---|---|---|---|---|---|---|")
        src = np.array([ds.source_of[i] for i in te])
        for name in ds.sources:
            m = src == name
            if not m.any():
                continue
            r = evaluate_source(pt[m], yt[m], labels, ds.source_labels[name], th)
            f = r["flag_rules"]
            print(f"| {name} | {int(m.sum())} | {r['mel_auc']:.3f} | {r['balanced_accuracy']:.3f} | "
                  f"{f['melanoma']['sensitivity']:.3f} / {f['melanoma']['specificity']:.3f} | "
                  f"{f['malignant']['sensitivity']:.3f} | {r['benign_unflagged']:.3f} "
                  f"[{r['benign_unflagged_ci'][0]:.3f}, {r['benign_unflagged_ci'][1]:.3f}] |", flush=True)


if __name__ == "__main__":
    main()
