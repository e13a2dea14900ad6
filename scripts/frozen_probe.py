"""Linear probes on frozen features, scored out of source: does fine-tuning cost transferability?

A known remedy for a fine-tuned model that does not transfer is to keep the pretrained features
and train only a linear head (or to fine-tune less). This script measures that on our data
before anyone spends GPU time on it: pooled features of a backbone (ImageNet weights, or a
training checkpoint) at several depths, a logistic regression fit on the training sources'
train split with C chosen on their validation split, scored on the held-out source (all of it)
and on the training sources' test split.

    python scripts/frozen_probe.py --data ham10000=../shared/data/ham10000 \
        --data isic2017=../shared/data/isic2017-train --holdout isic2017 \
        --weights imagenet --arch lite0 --size 224 --cache /tmp/f_in0_224.npz

Features are cached (`--cache`): extracting 12,000 images takes 5-9 minutes on 2 cores, the
probes a minute each.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from build_model.data import load_sources, split_sources  # noqa: E402
from build_model.evaluate import auc  # noqa: E402
from build_model.metrics import summarize_restricted  # noqa: E402
from edge_agent.calibration_math import bootstrap_ci  # noqa: E402


def extract(ds, arch: str, size: int, weights: str, batch: int = 32) -> dict[str, np.ndarray]:
    """Global-average-pooled outputs of the last four stages and of the head, and the logits."""
    import torch

    from build_model.export import load_checkpoint
    from build_model.model import build_model
    from edge_agent.preprocess import Preprocessing, preprocess

    if weights == "imagenet":
        model = build_model(len(ds.labels), size, pretrained=True, arch=arch)
        pre = Preprocessing(input_size=size)
    else:
        model, state = load_checkpoint(Path(weights), size)
        pre = Preprocessing.from_dict({**state["preprocessing"], "input_size": size})
    model.eval()
    width = [list(b.parameters())[-1].shape[0] for b in model._blocks]
    ends = [i for i in range(len(width)) if i == len(width) - 1 or width[i + 1] != width[i]][-4:]
    seen: dict[int, torch.Tensor] = {}
    for i in ends:
        model._blocks[i].register_forward_hook(lambda _m, _a, out, i=i: seen.__setitem__(i, out))
    feats: dict[str, list[np.ndarray]] = {f"b{i}": [] for i in ends} | {"head": [], "logits": []}
    with torch.no_grad():
        for s in range(0, len(ds), batch):
            x = torch.from_numpy(np.stack([preprocess(ds.image(i), pre) for i in range(s, min(len(ds), s + batch))]))
            head = model.features(x).mean(dim=(2, 3))
            for i in ends:
                feats[f"b{i}"].append(seen[i].mean(dim=(2, 3)).numpy())
            feats["head"].append(head.numpy())
            feats["logits"].append(model._fc(head).numpy())
            print(f"\r{s + batch}/{len(ds)}", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    return {k: np.concatenate(v).astype(np.float32) for k, v in feats.items()}


def probe(X: np.ndarray, ds, split: np.ndarray, holdout: str, Cs: list[float], reps: int) -> dict:
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    y, src = ds.y, np.array(ds.source_of)
    tr, va, te, ho = (split == s for s in ("train", "val", "test", "holdout"))
    Xs = StandardScaler().fit(X[tr]).transform(X)
    mel = ds.labels.index("mel")
    best = None
    for C in Cs:
        clf = LogisticRegression(C=C, max_iter=3000, class_weight="balanced").fit(Xs[tr], y[tr])
        p = np.zeros((len(y), len(ds.labels)))
        p[:, clf.classes_] = clf.predict_proba(Xs)
        score = sum(summarize_restricted(y[va & (src == s)], p[va & (src == s)], ds.labels, ds.source_labels[s])
                    ["balanced_accuracy"] for s in ds.sources if s != holdout)
        if best is None or score > best[0]:
            best = (score, C, p)
    _, C, p = best
    yh, ph = y[ho], p[ho, mel]
    mel_auc = lambda i: auc(yh[i] == mel, ph[i])  # noqa: E731
    out = {"C": C, "holdout_mel_auc": mel_auc(np.arange(len(yh))), "holdout_mel_auc_ci": bootstrap_ci(mel_auc, len(yh), reps),
           "holdout_balanced_accuracy": summarize_restricted(yh, p[ho], ds.labels, ds.source_labels[holdout])["balanced_accuracy"]}
    for s in ds.sources:
        if s != holdout:
            m = te & (src == s)
            r = summarize_restricted(y[m], p[m], ds.labels, ds.source_labels[s])
            out[f"{s}_test"] = {"balanced_accuracy": r["balanced_accuracy"], "macro_auc": r["macro_auc"], "mel_auc": r["mel_auc"]}
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", action="append", required=True)
    ap.add_argument("--holdout", required=True)
    ap.add_argument("--weights", default="imagenet", help="'imagenet' or a training checkpoint (best.pt)")
    ap.add_argument("--arch", default="lite0", help="with --weights imagenet (a checkpoint knows its own)")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--cache", type=Path, help="features file: written after extraction, read when present")
    ap.add_argument("--features", default="head,b15,b14,b10+b14+b15+head", help="comma-separated; + concatenates")
    ap.add_argument("--C", default="0.01,0.03,0.1,0.3,1")
    ap.add_argument("--reps", type=int, default=1000)
    a = ap.parse_args(argv)
    import torch

    torch.set_num_threads(2)
    ds = load_sources(a.data)
    split = split_sources(ds, seed=0, holdout=a.holdout)
    if a.cache and a.cache.exists():
        feats = dict(np.load(a.cache))
    else:
        feats = extract(ds, a.arch, a.size, a.weights)
        if a.cache:
            np.savez(a.cache, **feats)
    print(f"| features ({a.weights}, {a.arch}, {a.size} px) | C | {a.holdout} melanoma AUC [95% CI] | {a.holdout} balanced accuracy "
          "| " + " | ".join(f"{s} test BA / macro AUC / mel AUC" for s in ds.sources if s != a.holdout) + " |")
    for name in a.features.split(","):
        missing = [k for k in name.split("+") if k not in feats]
        if missing:
            raise SystemExit(f"no feature {missing} in the cache; have {sorted(feats)}")
        r = probe(np.concatenate([feats[k] for k in name.split("+")], 1), ds, split, a.holdout,
                  [float(c) for c in a.C.split(",")], a.reps)
        lo, hi = r["holdout_mel_auc_ci"]
        rest = " | ".join(f"{r[s + '_test']['balanced_accuracy']:.3f} / {r[s + '_test']['macro_auc']:.3f} / "
                          f"{r[s + '_test']['mel_auc']:.3f}" for s in ds.sources if s != a.holdout)
        print(f"| {name} | {r['C']} | {r['holdout_mel_auc']:.3f} [{lo:.3f}, {hi:.3f}] | {r['holdout_balanced_accuracy']:.3f} | {rest} |",
              flush=True)


if __name__ == "__main__":
    main()
