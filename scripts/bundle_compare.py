#!/usr/bin/env python3
"""Paired comparison of bundles on the same images, each exactly as the agent screens it.

    python scripts/bundle_compare.py --data ham10000=../shared/data/ham10000 \
        --data isic2017=../shared/data/isic2017-train --split BUNDLE/split.csv --subset test \
        BUNDLE_A BUNDLE_B [BUNDLE_C ...] [--json out.json]

`build-model evaluate` scores one bundle; this scores several on the same files (the agent's decoder,
each bundle's preprocessing - views included -, primary variant, temperature and thresholds) and
gives, per source, each bundle's melanoma AUC with its 95% bootstrap interval, balanced accuracy,
each review rule's sensitivity/specificity and the share of benign lesions left unflagged, and the
**paired** bootstrap interval of its melanoma AUC minus the first bundle's (the same resampled
images for both, which is what tells a small real difference from noise). Unsigned bundles (an
experiment's) need EDGE_AGENT_ALLOW_UNSIGNED_BUNDLE=true, as for the agent.
"""
from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from build_model.data import load_sources  # noqa: E402
from build_model.evaluate import BOOTSTRAP, auc, evaluate_source, screen_images  # noqa: E402


def paired_diff(pos: np.ndarray, a: np.ndarray, ref: np.ndarray, reps: int, seed: int = 0) -> tuple[float, float]:
    """95% percentile interval of AUC(a) - AUC(ref) over image resamples shared by both."""
    rng = np.random.default_rng(seed)
    d = []
    for _ in range(reps):
        i = rng.integers(0, len(pos), len(pos))
        if pos[i].any() and not pos[i].all():
            d.append(auc(pos[i], a[i]) - auc(pos[i], ref[i]))
    return float(np.percentile(d, 2.5)), float(np.percentile(d, 97.5))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("bundles", nargs="+", type=Path, help="bundle folders; the first is the reference")
    ap.add_argument("--data", action="append", required=True, help="NAME=PATH (repeatable), as for build-model")
    ap.add_argument("--split", type=Path, default=None, help="a split.csv (e.g. a bundle's) to score only --subset")
    ap.add_argument("--subset", default=None, help="with --split: train, val, test or holdout")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--bootstrap", type=int, default=BOOTSTRAP)
    ap.add_argument("--json", type=Path, default=None, help="write every number here too")
    a = ap.parse_args()
    ds = load_sources(a.data)
    idx = np.arange(len(ds))
    if a.split is not None and a.subset:
        rows = {(r.get("source") or "", r["image_id"]): r["split"] for r in csv.DictReader(open(a.split, newline=""))}
        idx = np.array([i for i in idx if rows.get((ds.source_of[i], ds.ids[i])) == a.subset], dtype=int)
    print(f"{len(idx)} images{f' (split {a.subset!r} of {a.split})' if a.subset else ''}", flush=True)
    screened = {}
    for b in a.bundles:
        bundle, variant, probs, reasons = screen_images(b, [ds.paths[i] for i in idx], a.threads)
        screened[b] = (bundle, probs)
        print(f"{b}: {bundle.model_id}, {variant}, views {list(bundle.preprocessing.rules)}, tta {bundle.tta}, "
              f"{len(reasons)} refused by the decoder", flush=True)
    labels = list(screened[a.bundles[0]][0].labels)
    src = np.array([ds.source_of[i] for i in idx])
    out: dict = {}
    print("\n| source | bundle | images | mel AUC [95% CI] | paired diff [95% CI] | BA | "
          "mel flag sens / spec | benign unflagged |\n|---|---|---|---|---|---|---|---|")
    for name in ds.sources:
        sel = [k for k in np.flatnonzero(src == name) if all(screened[b][1][k] is not None for b in a.bundles)]
        if not sel:
            continue
        y = np.array([labels.index(ds.labels[ds.y[idx[k]]]) for k in sel])
        allowed = [lab for lab in labels if lab in ds.source_labels[name]]
        pos, mel = y == labels.index("mel"), labels.index("mel")
        ref = None
        for b in a.bundles:
            bundle, probs = screened[b]
            p = np.stack([probs[k] for k in sel])
            rules = {k: v for k, v in bundle.thresholds.items() if "labels" in v}
            r = evaluate_source(p, y, labels, allowed, rules, a.bootstrap)
            diff = ""
            if ref is None:
                ref = p[:, mel]
            else:
                lo, hi = paired_diff(pos, p[:, mel], ref, a.bootstrap)
                r["mel_auc_paired_diff"] = [auc(pos, p[:, mel]) - auc(pos, ref), lo, hi]
                diff = f"{r['mel_auc_paired_diff'][0]:+.3f} [{lo:+.3f}, {hi:+.3f}]"
            m = r["flag_rules"].get("melanoma", {})
            print(f"| {name} | {b.name} | {len(sel)} | {r['mel_auc']:.3f} [{r['mel_auc_ci'][0]:.3f}, "
                  f"{r['mel_auc_ci'][1]:.3f}] | {diff or 'reference'} | {r['balanced_accuracy']:.3f} | "
                  f"{m.get('sensitivity', float('nan')):.3f} / {m.get('specificity', float('nan')):.3f} | "
                  f"{r.get('benign_unflagged', float('nan')):.3f} |", flush=True)
            out.setdefault(name, {})[str(b)] = r
    if a.json:
        a.json.write_text(json.dumps(out, indent=1, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o)))


if __name__ == "__main__":
    main()
