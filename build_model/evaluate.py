"""Per-source evaluation: the numbers a clinic would see, with their uncertainty.

Everything here works on calibrated probabilities (N x classes) and integer
labels, so the same arithmetic scores a PyTorch checkpoint during an ablation
and a bundle's INT8 model through the agent's own preprocessing
(`build-model evaluate`). Each source is scored on the classes it labels
(ISIC 2017 has no carcinomas), and every headline number has a bootstrap 95%
interval: a few hundred images per source make differences of 0.02 noise.
"""
from __future__ import annotations

import numpy as np
from scipy.stats import rankdata

from edge_agent.calibration_math import bootstrap_ci

from .calibrate import risk_score
from .metrics import ece, sens_spec, summarize_restricted

BOOTSTRAP = 1000
BENIGN = ("nv", "bkl", "df", "vasc")


def auc(pos: np.ndarray, score: np.ndarray) -> float:
    """ROC AUC by ranks (ties averaged): fast enough to bootstrap a thousand times."""
    pos = np.asarray(pos, bool)
    n1, n0 = int(pos.sum()), int((~pos).sum())
    if n1 == 0 or n0 == 0:
        return float("nan")
    r = rankdata(score)
    return float((r[pos].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def bootstrap(stat, n: int, reps: int = BOOTSTRAP, seed: int = 0) -> tuple[float, float]:
    """Percentile 95% interval of `stat(idx)` over resamples of n items with replacement: the agent's
    `bootstrap_ci` (same resamples, same interval), with NaN instead of None where no resample had a value,
    because the reports' JSON and tables here have always written NaN."""
    lo, hi = bootstrap_ci(stat, n, reps, seed)
    return (float("nan"), float("nan")) if lo is None or hi is None else (lo, hi)


def evaluate_source(prob: np.ndarray, y: np.ndarray, labels: list[str], allowed: list[str],
                    thresholds: dict | None = None, reps: int = BOOTSTRAP, seed: int = 0) -> dict:
    """Melanoma AUC, one-vs-rest AUCs, balanced accuracy, confusion, each review rule's
    sensitivity/specificity and flag rate, benign lesions left unflagged, ECE; 95% bootstrap intervals."""
    out = summarize_restricted(y, prob, labels, allowed)
    n = len(y)
    mel = labels.index("mel") if "mel" in labels else None
    if mel is not None:
        pos = y == mel
        out["mel_auc_ci"] = bootstrap(lambda i: auc(pos[i], prob[i, mel]), n, reps, seed)
    cols = [labels.index(a) for a in allowed]
    sub = prob[:, cols] / np.clip(prob[:, cols].sum(1, keepdims=True), 1e-12, None)
    yy = np.array([cols.index(int(v)) if int(v) in cols else -1 for v in y])

    def ba(i: np.ndarray) -> float:
        yi, pi = yy[i], sub[i].argmax(1)
        rec = [float((pi[yi == k] == k).mean()) for k in range(len(cols)) if (yi == k).any()]
        return float(np.mean(rec)) if rec else float("nan")

    out["balanced_accuracy_ci"] = bootstrap(ba, n, reps, seed)
    out["ece"] = ece(sub, yy) if (yy >= 0).all() else float("nan")
    out["flag_rules"] = {}
    flagged_any = np.zeros(n, bool)
    for name, th in (thresholds or {}).items():
        if "labels" not in th:
            continue
        group = [g for g in th["labels"] if g in labels]
        score = risk_score(prob, labels, group)
        flag = score >= th["probability"]
        flagged_any |= flag
        positive = np.isin(y, [labels.index(g) for g in group])
        s, sp = sens_spec(positive, flag)
        rule = {"threshold": th["probability"], "positives": int(positive.sum()), "sensitivity": s, "specificity": sp,
                "flag_rate": float(flag.mean())}
        if positive.any():
            rule["sensitivity_ci"] = bootstrap(lambda i: float(flag[i][positive[i]].mean()) if positive[i].any() else float("nan"),
                                               n, reps, seed)
        out["flag_rules"][name] = rule
    benign = np.isin(y, [labels.index(b) for b in BENIGN if b in labels])
    if thresholds and benign.any():
        out["benign_unflagged"] = float((~flagged_any[benign]).mean())
        out["benign_unflagged_ci"] = bootstrap(lambda i: float((~flagged_any[i][benign[i]]).mean()) if benign[i].any() else float("nan"),
                                               n, reps, seed)
        out["flag_rate"] = float(flagged_any.mean())
    return out


# --- `build-model evaluate`: a bundle, through the agent's own code, on labelled folders ------

def screen_images(bundle_dir, paths: list, threads: int = 2, batch: int = 32):
    """Calibrated probabilities for image files exactly as the agent computes them.

    The agent's decoder (format sniffing, limits, reduced JPEG decode), the bundle's
    preprocessing, its primary variant through the agent's `Engine` (INT8 when approved),
    its test-time augmentation and temperature. Files the agent would quarantine come back
    as None with the reason, so an evaluation counts them instead of silently dropping them.
    """
    from concurrent.futures import ThreadPoolExecutor

    from edge_agent.bundle import load_bundle
    from edge_agent.decode import QualityLimits, Rejected, decode_image
    from edge_agent.infer import Engine
    from edge_agent.triage import softmax as agent_softmax

    bundle = load_bundle(bundle_dir)
    engine = Engine(bundle, threads=threads)
    variant = engine.load()

    def decode(p):
        try:
            return decode_image(open(p, "rb").read(), bundle.preprocessing, 64_000_000, QualityLimits()), None
        except Rejected as e:
            return None, e.code
    probs: list = [None] * len(paths)
    reasons: dict[int, str] = {}
    with ThreadPoolExecutor(max(1, threads)) as ex:
        for start in range(0, len(paths), batch):
            chunk = list(ex.map(decode, paths[start:start + batch]))
            ok = [(start + k, d) for k, (d, why) in enumerate(chunk) if d is not None]
            for k, (d, why) in enumerate(chunk):
                if d is None:
                    reasons[start + k] = why
            if ok:
                logits, _ = engine.infer(np.stack([d.tensor for _, d in ok]))
                p = agent_softmax(logits, bundle.temperature)
                for (i, _), row in zip(ok, p):
                    probs[i] = row
    return bundle, variant, probs, reasons


def evaluate_bundle(bundle_dir, specs: list[str], split_csv=None, subset: str | None = None,
                    threads: int = 2, reps: int = BOOTSTRAP, log=print, label_maps: dict | None = None) -> dict:
    """Per source: the metrics of `evaluate_source` at the bundle's thresholds, plus the curves' data."""
    import csv

    from .data import load_sources

    ds = load_sources(specs, label_maps)
    idx = np.arange(len(ds))
    if split_csv is not None and subset:
        rows = {(r.get("source") or "", r["image_id"]): r["split"] for r in csv.DictReader(open(split_csv, newline=""))}
        by_id = {iid: s for (_, iid), s in rows.items()}
        keep = [i for i in idx if rows.get((ds.source_of[i], ds.ids[i]), by_id.get(ds.ids[i])) == subset]
        idx = np.array(keep, dtype=int)
        log(f"evaluate: {len(idx)} images of split {subset!r} from {split_csv}")
    bundle, variant, probs, reasons = screen_images(bundle_dir, [ds.paths[i] for i in idx], threads)
    labels = list(bundle.labels)
    if list(ds.labels) != labels:
        missing = [l for l in ds.labels if l not in labels]
        if missing:
            raise ValueError(f"the data has labels {missing} that the bundle does not know ({labels})")
    thresholds = {k: v for k, v in bundle.thresholds.items() if "labels" in v}
    out = {"bundle": str(bundle_dir), "model_id": bundle.model_id, "variant": variant,
           "tta": bundle.manifest.get("tta", "none"), "subset": subset, "sources": {}}
    src = np.array([ds.source_of[i] for i in idx])
    for name in ds.sources:
        sel = [k for k in np.flatnonzero(src == name) if probs[k] is not None]
        quarantined = {}
        for k in np.flatnonzero(src == name):
            if probs[k] is None:
                quarantined[reasons[k]] = quarantined.get(reasons[k], 0) + 1
        if not sel:
            continue
        p = np.stack([probs[k] for k in sel])
        y = np.array([labels.index(ds.labels[ds.y[idx[k]]]) for k in sel])
        allowed = [l for l in labels if l in ds.source_labels[name]]
        r = evaluate_source(p, y, labels, allowed, thresholds, reps)
        r["quarantined"] = quarantined
        r["curves"] = _curves(p, y, labels, allowed)
        out["sources"][name] = r
        log(f"evaluate {name}: {len(sel)} images, melanoma AUC {r['mel_auc']:.3f} "
            f"[{r['mel_auc_ci'][0]:.3f}, {r['mel_auc_ci'][1]:.3f}], balanced accuracy {r['balanced_accuracy']:.3f}")
    return out


def _curves(p: np.ndarray, y: np.ndarray, labels: list[str], allowed: list[str]) -> dict:
    from sklearn.metrics import roc_curve

    roc = {}
    for c in allowed:
        k = labels.index(c)
        pos = y == k
        if 0 < pos.sum() < len(y):
            fpr, tpr, _ = roc_curve(pos, p[:, k])
            roc[c] = {"fpr": fpr[:: max(1, len(fpr) // 200)].tolist(), "tpr": tpr[:: max(1, len(tpr) // 200)].tolist()}
    cols = [labels.index(a) for a in allowed]
    sub = p[:, cols] / p[:, cols].sum(1, keepdims=True)
    conf, correct = sub.max(1), np.array([cols[j] for j in sub.argmax(1)]) == y
    edges = np.linspace(0, 1, 11)
    bins = []
    for lo, hi in zip(edges[:-1], edges[1:]):
        m = (conf > lo) & (conf <= hi)
        bins.append({"lo": float(lo), "hi": float(hi), "n": int(m.sum()),
                     "confidence": float(conf[m].mean()) if m.any() else None,
                     "accuracy": float(correct[m].mean()) if m.any() else None})
    return {"roc": roc, "reliability": bins}


def _fmt_ci(v: float, ci) -> str:
    return f"{v:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]" if ci and not np.isnan(v) else (f"{v:.3f}" if not np.isnan(v) else "n/a")


def render_markdown(res: dict) -> str:
    lines = [f"## Evaluation of `{res['model_id']}` ({res['variant']}, TTA {res['tta']})", "",
             f"Data subset: {res['subset'] or 'all images'}. Each source is scored on the classes it labels; "
             "intervals are bootstrap 95%.", "",
             "| source | images | melanoma AUC | balanced accuracy | macro AUC | ECE | melanoma flag sens. | malignant flag sens. | benign unflagged | flag rate |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in res["sources"].items():
        fr = r.get("flag_rules", {})
        mel, mal = fr.get("melanoma", {}), fr.get("malignant", {})
        lines.append(f"| {name} | {r['n']} | {_fmt_ci(r['mel_auc'], r.get('mel_auc_ci'))} | "
                     f"{_fmt_ci(r['balanced_accuracy'], r.get('balanced_accuracy_ci'))} | {r['macro_auc']:.3f} | {r['ece']:.3f} | "
                     f"{_fmt_ci(mel.get('sensitivity', float('nan')), mel.get('sensitivity_ci'))} | "
                     f"{_fmt_ci(mal.get('sensitivity', float('nan')), mal.get('sensitivity_ci'))} | "
                     f"{_fmt_ci(r.get('benign_unflagged', float('nan')), r.get('benign_unflagged_ci'))} | {r.get('flag_rate', float('nan')):.3f} |")
    for name, r in res["sources"].items():
        lines += ["", f"### {name}: per class and review rules", "",
                  "| class | support | sensitivity | specificity | one-vs-rest AUC |", "|---|---|---|---|---|"]
        for c, v in r["per_class"].items():
            lines.append(f"| {c} | {v['support']} | {v['sensitivity']:.3f} | {v['specificity']:.3f} | {v['auc']:.3f} |")
        lines += ["", "| rule | threshold | positives | sensitivity | specificity | flag rate |", "|---|---|---|---|---|---|"]
        for rn, v in r.get("flag_rules", {}).items():
            lines.append(f"| {rn} | {v['threshold']:.4f} | {v['positives']} | {v['sensitivity']:.3f} | {v['specificity']:.3f} | {v['flag_rate']:.3f} |")
        cls = r["classes"]
        lines += ["", "Confusion matrix (rows: truth, columns: prediction among this source's classes):", "",
                  "| | " + " | ".join(cls) + " |", "|---|" + "---|" * len(cls)]
        for c, row in zip(cls, r["confusion"]):
            lines.append(f"| {c} | " + " | ".join(str(v) for v in row) + " |")
        if r.get("quarantined"):
            lines += ["", f"Quarantined by the agent (not scored): {r['quarantined']}"]
    return "\n".join(lines) + "\n"


def plot(res: dict, folder) -> list:
    """ROC curves and a reliability diagram per source (PNG, matplotlib from the build extra)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from pathlib import Path

    written = []
    for name, r in res["sources"].items():
        fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4.5))
        for c, cur in r["curves"]["roc"].items():
            a.plot(cur["fpr"], cur["tpr"], label=f"{c} (AUC {r['per_class'].get(c, {}).get('auc', float('nan')):.3f})"
                   if c in r["per_class"] else c)
        a.plot([0, 1], [0, 1], ":", color="grey")
        a.set(xlabel="1 - specificity", ylabel="sensitivity", title=f"{name}: one-vs-rest ROC")
        a.legend(fontsize=8)
        bins = [x for x in r["curves"]["reliability"] if x["n"]]
        b.bar([x["lo"] + 0.05 for x in bins], [x["accuracy"] for x in bins], width=0.09, alpha=0.7, label="accuracy")
        b.plot([0, 1], [0, 1], ":", color="grey")
        b.set(xlabel="top-1 confidence", ylabel="accuracy", title=f"{name}: reliability (ECE {r['ece']:.3f})")
        fig.tight_layout()
        path = Path(folder) / f"evaluation-{name}.png"
        fig.savefig(path, dpi=90)
        plt.close(fig)
        written.append(path)
    return written
