"""Classification metrics used by training, the gate and the report (numpy + scikit-learn)."""
from __future__ import annotations

import numpy as np
from sklearn.metrics import roc_auc_score

# One definition for the build and the agent's site calibration.
from edge_agent.calibration_math import sens_spec, softmax

__all__ = ["confusion", "ece", "sens_spec", "softmax", "summarize", "summarize_restricted"]


def confusion(y: np.ndarray, pred: np.ndarray, n: int) -> np.ndarray:
    return np.bincount(y * n + pred, minlength=n * n).reshape(n, n)


def summarize(y: np.ndarray, prob: np.ndarray, labels: list[str]) -> dict:
    """Accuracy, balanced accuracy, macro AUC and per-class sensitivity/specificity of argmax predictions."""
    n = len(labels)
    pred = prob.argmax(1)
    cm = confusion(y, pred, n)
    per_class = {}
    for k, name in enumerate(labels):
        s, sp = sens_spec(y == k, pred == k)
        try:
            auc = float(roc_auc_score(y == k, prob[:, k])) if 0 < (y == k).sum() < len(y) else float("nan")
        except ValueError:
            auc = float("nan")
        per_class[name] = {"sensitivity": s, "specificity": sp, "auc": auc, "support": int((y == k).sum())}
    sens = [v["sensitivity"] for v in per_class.values() if v["support"]]
    aucs = [v["auc"] for v in per_class.values() if not np.isnan(v["auc"])]
    return {
        "n": int(len(y)),
        "accuracy": float((pred == y).mean()),
        "balanced_accuracy": float(np.mean(sens)),
        "macro_auc": float(np.mean(aucs)) if aucs else float("nan"),
        "per_class": per_class,
        "confusion": cm.tolist(),
    }


def ece(prob: np.ndarray, y: np.ndarray, bins: int = 15) -> float:
    """Expected calibration error of the top-1 confidence."""
    conf = prob.max(1); correct = prob.argmax(1) == y
    edges = np.linspace(0, 1, bins + 1)
    total = 0.0
    for lo, hi in zip(edges[:-1], edges[1:]):
        m = (conf > lo) & (conf <= hi)
        if m.any():
            total += m.mean() * abs(correct[m].mean() - conf[m].mean())
    return float(total)


def summarize_restricted(y: np.ndarray, prob: np.ndarray, labels: list[str], allowed: list[str]) -> dict:
    """`summarize` on the classes a source labels: argmax and AUCs among `allowed` only.

    ISIC 2017 has no carcinomas: its balanced accuracy is the mean recall of mel, nv and bkl,
    with the prediction the most probable of those three. `mel_auc` uses the model's full
    P(mel), the number the agent's review flag is built on.
    """
    cols = [labels.index(a) for a in allowed]
    sub = prob[:, cols]
    sub = sub / np.clip(sub.sum(1, keepdims=True), 1e-12, None)
    remap = {c: k for k, c in enumerate(cols)}
    keep = np.isin(y, cols)
    yy = np.array([remap[int(v)] for v in y[keep]], dtype=int)
    out = summarize(yy, sub[keep], list(allowed))
    mel = labels.index("mel") if "mel" in labels else None
    pos = (y == mel) if mel is not None else None
    out["mel_auc"] = float(roc_auc_score(pos, prob[:, mel])) if mel is not None and 0 < pos.sum() < len(y) else float("nan")
    out["classes"] = list(allowed)
    return out
