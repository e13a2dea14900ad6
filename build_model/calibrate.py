"""Temperature scaling and review thresholds, both fitted on the validation split.

The agent flags a case when a calibrated probability crosses a threshold, so
the thresholds are chosen for sensitivity (missing a melanoma is the costly
error) and their test-split behaviour is recorded next to them, measured on
data that chose nothing.
"""
from __future__ import annotations

import numpy as np

# The arithmetic a site re-fit shares with the build lives in edge_agent (which must not import build_model);
# re-exported here so build_model.calibrate.fit_temperature & co. keep working.
from edge_agent.calibration_math import fit_temperature, floor6 as _floor6, risk_score, threshold_for_sensitivity

from .metrics import ece, sens_spec, softmax

__all__ = ["fit_temperature", "risk_score", "threshold_for_sensitivity", "calibration_report", "choose_thresholds",
           "apply_thresholds", "by_source"]


def calibration_report(logits: np.ndarray, y: np.ndarray, t: float) -> dict:
    return {"temperature": t, "ece_before": ece(softmax(logits), y), "ece_after": ece(softmax(logits, t), y)}


def choose_thresholds(prob_val: np.ndarray, y_val: np.ndarray, labels: list[str], high_risk: list[str],
                      target: float = 0.95, sources: list[str] | np.ndarray | None = None,
                      min_positives: int = 20) -> dict:
    """The largest threshold per rule that reaches `target` sensitivity on validation.

    With `sources` (one name per validation image), the target must hold in *each* source that
    has at least `min_positives` positives for the rule: the threshold is the lowest of the
    per-source ones. A pooled threshold lets the big source set it and the other source miss
    melanomas (measured: HAM10000's threshold caught 62-65% of ISIC 2017 melanomas); the
    per-source minimum trades specificity for a sensitivity that transfers.
    """
    out = {}
    groups = {"melanoma": ["mel"], "malignant": high_risk}
    src = np.asarray(sources) if sources is not None else None
    for name, group in groups.items():
        if not all(g in labels for g in group):
            continue
        score = risk_score(prob_val, labels, group)
        positive = np.isin(y_val, [labels.index(g) for g in group])
        t = threshold_for_sensitivity(score, positive, target)
        rule = {"labels": group, "probability": 0.0, "target_sensitivity": target}
        if src is not None and len(set(src.tolist())) > 1:
            per = {}
            for s_name in sorted(set(src.tolist())):
                m = src == s_name
                if positive[m].sum() >= min_positives:
                    per[s_name] = threshold_for_sensitivity(score[m], positive[m], target)
            if per:
                t = min([t, *per.values()])
                rule["rule"] = "lowest of the pooled and per-source thresholds"
                rule["per_source_thresholds"] = {k: _floor6(v) for k, v in per.items()}
        s, sp = sens_spec(positive, score >= t)
        t = _floor6(t)  # rounding up could drop the positive the threshold was set on
        s, sp = sens_spec(positive, score >= t)
        rule.update(probability=t, val_sensitivity=s, val_specificity=sp)
        if src is not None and len(set(src.tolist())) > 1:
            rule["val_by_source"] = by_source(src, positive, score >= t)
        out[name] = rule
    return out


def apply_thresholds(thresholds: dict, prob: np.ndarray, y: np.ndarray, labels: list[str], split: str,
                     sources: list[str] | np.ndarray | None = None) -> dict:
    """Record a split's sensitivity/specificity (and flag rate) at the chosen thresholds, also per source."""
    src = np.asarray(sources) if sources is not None else None
    for name, th in thresholds.items():
        if "labels" not in th:
            continue
        score = risk_score(prob, labels, th["labels"])
        positive = np.isin(y, [labels.index(g) for g in th["labels"]])
        s, sp = sens_spec(positive, score >= th["probability"])
        th[f"{split}_sensitivity"], th[f"{split}_specificity"] = s, sp
        th[f"{split}_flag_rate"] = float((score >= th["probability"]).mean())
        if src is not None and len(set(src.tolist())) > 1:
            th[f"{split}_by_source"] = by_source(src, positive, score >= th["probability"])
    return thresholds


def by_source(src: np.ndarray, positive: np.ndarray, flagged: np.ndarray) -> dict:
    """A rule's sensitivity, specificity, positives and flag rate within each source."""
    out = {}
    for name in sorted(set(src.tolist())):
        m = src == name
        s, sp = sens_spec(positive[m], flagged[m])
        out[name] = {"sensitivity": s, "specificity": sp, "positives": int(positive[m].sum()),
                     "flag_rate": float(flagged[m].mean())}
    return out
