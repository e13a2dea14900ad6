"""Temperature scaling and review thresholds, both fitted on the validation split.

The agent flags a case when a calibrated probability crosses a threshold, so
the thresholds are chosen for sensitivity (missing a melanoma is the costly
error) and their test-split behaviour is recorded next to them, measured on
data that chose nothing.
"""
from __future__ import annotations

import numpy as np

from .metrics import ece, sens_spec, softmax


def fit_temperature(logits: np.ndarray, y: np.ndarray) -> float:
    """Temperature minimising validation NLL (1-D search over log T; convex enough for a grid + refine)."""
    def nll(t: float) -> float:
        p = softmax(logits, t)
        return float(-np.log(np.clip(p[np.arange(len(y)), y], 1e-12, 1)).mean())

    grid = np.exp(np.linspace(np.log(0.25), np.log(8), 200))
    best = min(grid, key=nll)
    lo, hi = best / 1.05, best * 1.05
    for _ in range(40):  # golden-section refine
        a, b = lo + 0.382 * (hi - lo), lo + 0.618 * (hi - lo)
        if nll(a) < nll(b):
            hi = b
        else:
            lo = a
    return float((lo + hi) / 2)


def calibration_report(logits: np.ndarray, y: np.ndarray, t: float) -> dict:
    return {"temperature": t, "ece_before": ece(softmax(logits), y), "ece_after": ece(softmax(logits, t), y)}


def risk_score(prob: np.ndarray, labels: list[str], group: list[str]) -> np.ndarray:
    idx = [labels.index(g) for g in group if g in labels]
    return prob[:, idx].sum(axis=1)


def threshold_for_sensitivity(score: np.ndarray, positive: np.ndarray, target: float) -> float:
    """Largest threshold whose sensitivity (score >= t) is at least `target`."""
    pos = np.sort(score[positive])[::-1]
    if len(pos) == 0:
        return 0.5
    k = int(np.ceil(target * len(pos)))  # need at least k positives at or above t
    return float(pos[min(k, len(pos)) - 1])


def choose_thresholds(prob_val: np.ndarray, y_val: np.ndarray, labels: list[str], high_risk: list[str],
                      target: float = 0.95) -> dict:
    out = {}
    groups = {"melanoma": ["mel"], "malignant": high_risk}
    for name, group in groups.items():
        if not all(g in labels for g in group):
            continue
        score = risk_score(prob_val, labels, group)
        positive = np.isin(y_val, [labels.index(g) for g in group])
        t = threshold_for_sensitivity(score, positive, target)
        s, sp = sens_spec(positive, score >= t)
        out[name] = {"labels": group, "probability": round(t, 6), "target_sensitivity": target,
                     "val_sensitivity": s, "val_specificity": sp}
    return out


def apply_thresholds(thresholds: dict, prob: np.ndarray, y: np.ndarray, labels: list[str], split: str) -> dict:
    """Record a split's sensitivity/specificity (and flag rate) at the chosen thresholds."""
    for name, th in thresholds.items():
        if "labels" not in th:
            continue
        score = risk_score(prob, labels, th["labels"])
        positive = np.isin(y, [labels.index(g) for g in th["labels"]])
        s, sp = sens_spec(positive, score >= th["probability"])
        th[f"{split}_sensitivity"], th[f"{split}_specificity"] = s, sp
        th[f"{split}_flag_rate"] = float((score >= th["probability"]).mean())
    return thresholds
