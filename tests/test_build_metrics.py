"""Metrics, temperature scaling, thresholds and the gate's arithmetic."""
from __future__ import annotations

import numpy as np

from build_model import gate
from build_model.calibrate import choose_thresholds, fit_temperature, threshold_for_sensitivity
from build_model.metrics import ece, sens_spec, softmax, summarize
from edge_agent.benchstats import latency_summary, percentile, ratio

LABELS = ["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"]


def test_summarize_balanced_accuracy_is_mean_recall() -> None:
    y = np.array([0, 0, 1, 1, 1, 1])
    prob = np.eye(2)[[0, 1, 1, 1, 1, 0]]
    s = summarize(y, prob, ["a", "b"])
    assert s["accuracy"] == 4 / 6
    assert s["balanced_accuracy"] == (0.5 + 0.75) / 2
    assert s["confusion"] == [[1, 1], [1, 3]]


def test_sens_spec() -> None:
    truth = np.array([True, True, False, False])
    assert sens_spec(truth, np.array([True, False, False, True])) == (0.5, 0.5)


def test_temperature_recovers_a_known_overconfidence() -> None:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 7, 4000)
    true_logits = rng.normal(0, 1, (4000, 7))
    true_logits[np.arange(4000), y] += 2.0
    # sample labels from the softmax of true logits, then make the model 3x overconfident
    p = softmax(true_logits)
    y = np.array([rng.choice(7, p=row) for row in p])
    t = fit_temperature(true_logits * 3, y)
    assert 2.5 < t < 3.5
    assert ece(softmax(true_logits * 3, t), y) < ece(softmax(true_logits * 3), y)


def test_threshold_reaches_target_sensitivity() -> None:
    rng = np.random.default_rng(1)
    score = rng.random(1000)
    positive = rng.random(1000) < 0.2
    t = threshold_for_sensitivity(score, positive, 0.95)
    assert (score[positive] >= t).mean() >= 0.95
    # and it is the largest such threshold: any higher candidate misses the target
    higher = np.sort(score[positive])[score[positive].size - int(np.ceil(0.95 * positive.sum())) + 1:]
    assert all((score[positive] >= h).mean() < 0.95 for h in higher[:3])


def test_choose_thresholds_melanoma_and_malignant() -> None:
    rng = np.random.default_rng(2)
    y = rng.integers(0, 7, 700)
    logits = rng.normal(0, 1, (700, 7))
    logits[np.arange(700), y] += 1.5
    th = choose_thresholds(softmax(logits), y, LABELS, ["mel", "bcc", "akiec"])
    assert th["melanoma"]["val_sensitivity"] >= 0.95 and th["malignant"]["val_sensitivity"] >= 0.95
    assert th["malignant"]["labels"] == ["mel", "bcc", "akiec"]


def test_gate_rejects_each_limit_and_approves_identical_models() -> None:
    rng = np.random.default_rng(3)
    y = rng.integers(0, 7, 500)
    logits = rng.normal(0, 1, (500, 7))
    logits[np.arange(500), y] += 3
    ok, why = gate.verdict(gate.compare(logits, logits.copy(), y, LABELS))
    assert ok, why
    broken = logits.copy()
    flip = rng.choice(500, 40, replace=False)
    broken[flip] = np.roll(broken[flip], 1, axis=1)
    ok, why = gate.verdict(gate.compare(logits, broken, y, LABELS))
    assert not ok and "agreement" in why and "balanced accuracy" in why


def test_bench_arithmetic() -> None:
    assert percentile([1, 2, 3, 4], 50) == 2.5
    assert percentile([5], 99) == 5
    assert percentile(list(range(101)), 95) == 95
    s = latency_summary([0.1] * 10, batch=8)
    assert abs(s["images_per_s"] - 80) < 1e-9 and abs(s["p99_ms"] - 100) < 1e-9
    assert ratio(10, 4) == 2.5 and ratio(1, 0) != ratio(1, 0)  # NaN
