"""Classification metrics used by training, the gate and the report (numpy + scikit-learn)."""
from __future__ import annotations

import numpy as np
from sklearn.metrics import roc_auc_score


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    z = logits / temperature
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def confusion(y: np.ndarray, pred: np.ndarray, n: int) -> np.ndarray:
    return np.bincount(y * n + pred, minlength=n * n).reshape(n, n)


def sens_spec(y_true_pos: np.ndarray, pred_pos: np.ndarray) -> tuple[float, float]:
    tp = np.sum(pred_pos & y_true_pos); fn = np.sum(~pred_pos & y_true_pos)
    tn = np.sum(~pred_pos & ~y_true_pos); fp = np.sum(pred_pos & ~y_true_pos)
    sens = tp / (tp + fn) if tp + fn else float("nan")
    spec = tn / (tn + fp) if tn + fp else float("nan")
    return float(sens), float(spec)


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
