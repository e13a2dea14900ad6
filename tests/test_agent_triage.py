"""Triage: calibrated probabilities, review reasons, and thresholds that config can only tighten."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from edge_agent.bundle import load_bundle
from edge_agent.config import ConfigError
from edge_agent.triage import Policy, softmax, triage

LABELS = ("akiec", "bcc", "bkl", "df", "mel", "nv", "vasc")


def probs(**p: float) -> np.ndarray:
    rest = (1.0 - sum(p.values())) / (len(LABELS) - len(p))
    return np.array([p.get(x, rest) for x in LABELS])


@pytest.fixture(scope="module")
def policy(bundle_dir: Path) -> Policy:
    # bundle thresholds: melanoma P(mel) >= 0.3, malignant P(mel+bcc+akiec) >= 0.5, low confidence top1 < 0.5
    return Policy.from_bundle(load_bundle(bundle_dir))


def test_softmax_with_temperature() -> None:
    logits = np.array([[2.0, 1.0, 0.0, -1.0, 3.0, 0.5, 0.0]])
    p1, p2 = softmax(logits, 1.0), softmax(logits, 2.0)
    assert np.allclose(p1.sum(axis=1), 1.0) and np.allclose(p2.sum(axis=1), 1.0)
    assert p2.max() < p1.max()  # a higher temperature softens
    assert softmax(np.array([[1000.0, 0, 0, 0, 0, 0, 0]]))[0, 0] == pytest.approx(1.0)  # stable


def test_confident_benign_needs_no_review(policy: Policy) -> None:
    t = triage(probs(nv=0.9, mel=0.02), policy)
    assert t.label == "nv" and t.confidence == pytest.approx(0.9)
    assert not t.needs_review and t.reasons == ()


def test_melanoma_threshold(policy: Policy) -> None:
    t = triage(probs(nv=0.6, mel=0.3), policy)
    assert t.label == "nv" and "high_risk" in t.reasons and "melanoma" in t.rules_hit
    assert "high_risk" not in triage(probs(nv=0.65, mel=0.29), policy).reasons


def test_malignant_sum_threshold(policy: Policy) -> None:
    t = triage(probs(bcc=0.2, akiec=0.2, mel=0.1, nv=0.45), policy)
    assert t.rules_hit == ("malignant",) and t.p_high_risk == pytest.approx(0.5)


def test_low_confidence_poor_quality_and_disagreement(policy: Policy) -> None:
    t = triage(probs(nv=0.4, bkl=0.35), policy, poor_quality=True, disagreement=True)
    assert t.reasons == ("low_confidence", "poor_quality", "model_disagreement")


def test_config_may_tighten_thresholds(bundle_dir: Path) -> None:
    p = Policy.from_bundle(load_bundle(bundle_dir), {"melanoma": 0.1, "low_confidence": 0.8})
    assert {r.name: r.probability for r in p.rules}["melanoma"] == 0.1 and p.low_confidence == 0.8
    assert "high_risk" in triage(probs(nv=0.85, mel=0.12), p).reasons


def test_config_may_not_loosen_thresholds_without_override(bundle_dir: Path) -> None:
    b = load_bundle(bundle_dir)
    with pytest.raises(ConfigError, match=r"melanoma=0.6 is less strict than the bundle's 0.3.*threshold_override"):
        Policy.from_bundle(b, {"melanoma": 0.6})
    with pytest.raises(ConfigError, match="low_confidence=0.2 is less strict"):
        Policy.from_bundle(b, {"low_confidence": 0.2})
    loose = Policy.from_bundle(b, {"melanoma": 0.6}, allow_looser=True)
    assert {r.name: r.probability for r in loose.rules}["melanoma"] == 0.6


def test_unknown_threshold_name_is_an_error(bundle_dir: Path) -> None:
    with pytest.raises(ConfigError, match="unknown threshold"):
        Policy.from_bundle(load_bundle(bundle_dir), {"melanomma": 0.1})


def test_loosening_is_refused_at_agent_start(dirs: dict[str, Path], bundle_dir: Path) -> None:
    from click.testing import CliRunner

    from edge_agent.cli import main

    args = ["scan", "--inbox", str(dirs["inbox"]), "--db", str(dirs["db"]), "--model", str(bundle_dir),
            "--threshold", "malignant=0.9"]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 2 and "less strict" in res.output
    assert CliRunner().invoke(main, [*args, "--threshold-override"]).exit_code == 0
