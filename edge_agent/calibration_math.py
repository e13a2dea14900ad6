"""Temperature scaling, sensitivity thresholds and bootstrap intervals: pure numpy, shared by the build and the agent.

Why here: the build (build_model/calibrate.py) fits the temperature and the review thresholds on its
validation split, and a site re-fits the same two things on its own labelled cases (`edge-agent
calibrate`). One definition keeps "the threshold that reaches 95% sensitivity" meaning the same thing in
both places; edge_agent must not import build_model (torch), so the arithmetic lives on this side and
build_model re-exports it.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Row-wise softmax(logits / T) in the input's precision (the build's numbers stay byte-identical)."""
    z = logits / temperature
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def nll(logits: np.ndarray, y: np.ndarray, t: float) -> float:
    """Mean negative log-likelihood of the true classes at temperature t."""
    p = softmax(logits, t)
    return float(-np.log(np.clip(p[np.arange(len(y)), y], 1e-12, 1)).mean())


def fit_temperature(logits: np.ndarray, y: np.ndarray) -> float:
    """Temperature minimising NLL (1-D search over log T in [0.25, 8]; convex enough for a grid + refine)."""
    def f(t: float) -> float:
        return nll(logits, y, t)

    grid = np.exp(np.linspace(np.log(0.25), np.log(8), 200))
    best = min(grid, key=f)
    lo, hi = best / 1.05, best * 1.05
    for _ in range(40):  # golden-section refine
        a, b = lo + 0.382 * (hi - lo), lo + 0.618 * (hi - lo)
        if f(a) < f(b):
            hi = b
        else:
            lo = a
    return float((lo + hi) / 2)


def logits_from_probabilities(prob: np.ndarray, temperature: float) -> np.ndarray:
    """Logits up to a per-row constant from probabilities computed as softmax(z / T): T * log p.

    Softmax is invariant to a constant added to a row, so these logits give back exactly the stored
    probabilities at T and the right ones at any other temperature. Probabilities stored rounded to 0
    are clipped to 1e-7 (the rounding step of the results table), which bounds their logit instead of -inf.
    """
    return temperature * np.log(np.clip(np.asarray(prob, np.float64), 1e-7, 1.0))


def risk_score(prob: np.ndarray, labels: Sequence[str], group: Sequence[str]) -> np.ndarray:
    """The probability summed over a rule's labels, per row (what a high-risk rule compares to its threshold)."""
    idx = [list(labels).index(g) for g in group if g in labels]
    return prob[:, idx].sum(axis=1)


def threshold_for_sensitivity(score: np.ndarray, positive: np.ndarray, target: float) -> float:
    """Largest threshold whose sensitivity (score >= t) is at least `target`."""
    pos = np.sort(score[positive])[::-1]
    if len(pos) == 0:
        return 0.5
    k = int(np.ceil(target * len(pos)))  # need at least k positives at or above t
    return float(pos[min(k, len(pos)) - 1])


def threshold_for_flag_count(score: np.ndarray, k: int) -> float:
    """Largest threshold that flags at least k of the scores (score >= t)."""
    if k <= 0:
        return float(np.nextafter(score.max(), np.inf)) if len(score) else 1.0
    s = np.sort(score)[::-1]
    return float(s[min(k, len(s)) - 1])


def floor6(t: float) -> float:
    """Round a threshold down to 6 decimals: rounding up could drop the positive the threshold was set on."""
    return float(np.floor(t * 1e6) / 1e6)


def sens_spec(y_true_pos: np.ndarray, pred_pos: np.ndarray) -> tuple[float, float]:
    tp = np.sum(pred_pos & y_true_pos); fn = np.sum(~pred_pos & y_true_pos)
    tn = np.sum(~pred_pos & ~y_true_pos); fp = np.sum(pred_pos & ~y_true_pos)
    sens = tp / (tp + fn) if tp + fn else float("nan")
    spec = tn / (tn + fp) if tn + fp else float("nan")
    return float(sens), float(spec)


def min_positives(target: float) -> int:
    """Fewest positives for which a sensitivity target can be told from "caught them all": 1 / (1 - target).

    With fewer, one missed positive moves the sensitivity by more than the target's margin, so the
    fitted threshold says nothing beyond "flag every positive we happened to see" (20 for 0.95)."""
    return max(1, int(np.ceil(1.0 / max(1e-9, 1.0 - target) - 1e-9)))


def bootstrap_ci(statistic: Callable[[np.ndarray], float], n: int, reps: int = 1000, seed: int = 0,
                 strata: np.ndarray | None = None) -> tuple[float | None, float | None]:
    """Percentile 95% interval of statistic(indices) over `reps` resamples of n cases with replacement.

    With `strata` (e.g. positive/negative), each stratum is resampled within itself, so a resample never
    loses all positives (the interval then describes the threshold, not the luck of the draw). NaN
    statistics (no positives in a resample) are ignored; None when none is finite."""
    rng = np.random.default_rng(seed)
    groups = [np.arange(n)] if strata is None else [np.flatnonzero(strata == g) for g in np.unique(strata)]
    vals = []
    for _ in range(reps):
        idx = np.concatenate([g[rng.integers(0, len(g), len(g))] for g in groups if len(g)])
        v = statistic(idx)
        if v is not None and np.isfinite(v):
            vals.append(v)
    if not vals:
        return None, None
    lo, hi = np.percentile(vals, [2.5, 97.5])
    return float(lo), float(hi)
