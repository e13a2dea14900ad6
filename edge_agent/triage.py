"""Turn logits into calibrated probabilities and review flags.

The thresholds come from the bundle, where they were chosen on validation
data for a target sensitivity. Local configuration may only make them
stricter (flag more images for a clinician); loosening them silently would
trade missed melanomas for convenience, so it needs an explicit override.
"""
from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np

from .bundle import Bundle
from .config import ConfigError

REASONS = ("high_risk", "low_confidence", "poor_quality", "model_disagreement")


@dataclass(frozen=True)
class Rule:
    """Flag `high_risk` when the probability summed over `labels` is >= `probability`."""

    name: str
    labels: tuple[str, ...]
    probability: float


@dataclass(frozen=True)
class Policy:
    labels: tuple[str, ...]
    temperature: float
    rules: tuple[Rule, ...]
    low_confidence: float | None  # flag when the top-1 probability is below this
    high_risk_labels: tuple[str, ...]
    # (name, bundle value, value in force, looser) for each locally overridden threshold
    overrides: tuple[tuple[str, float, float, bool], ...] = ()

    def thresholds(self) -> dict[str, float]:
        """The thresholds in force, by rule name (low_confidence included when the bundle defines it)."""
        out = {r.name: r.probability for r in self.rules}
        if self.low_confidence is not None:
            out["low_confidence"] = self.low_confidence
        return out

    def to_json(self) -> str:
        """The policy in force as recorded in every result row (results.policy), compact and canonical:
        {"thresholds": {rule: p, ...}, "overridden": [rules changed locally], "loosened": [of those, the
        ones made less strict under threshold_override]}. Query with json_extract(policy, '$.thresholds.melanoma')."""
        return json.dumps({"thresholds": self.thresholds(), "overridden": [o[0] for o in self.overrides],
                           "loosened": [o[0] for o in self.overrides if o[3]]}, separators=(",", ":"))

    @classmethod
    def from_bundle(cls, bundle: Bundle, overrides: dict[str, float] | None = None, allow_looser: bool = False) -> "Policy":
        """The bundle's thresholds with local overrides applied; stricter-only unless `allow_looser`."""
        overrides = dict(overrides or {})
        rules: list[Rule] = []
        low: float | None = None
        changed: list[tuple[str, float, float, bool]] = []
        for name, spec in bundle.thresholds.items():
            if "labels" in spec:
                p = float(spec["probability"])
                if name in overrides:
                    new = overrides.pop(name)
                    if new > p and not allow_looser:
                        raise ConfigError(
                            f"threshold {name}={new} is less strict than the bundle's {p} (fewer images would be flagged "
                            f"{'/'.join(spec['labels'])}); use a value <= {p}, or set threshold_override "
                            "(--threshold-override) if a clinician approved it")
                    changed.append((name, p, new, new > p))
                    p = new
                rules.append(Rule(name, tuple(spec["labels"]), p))
            elif name == "low_confidence":
                low = float(spec["top1_probability"])
                if name in overrides:
                    new = overrides.pop(name)
                    if new < low and not allow_looser:
                        raise ConfigError(
                            f"threshold low_confidence={new} is less strict than the bundle's {low} (fewer uncertain "
                            f"results would be flagged); use a value >= {low}, or set threshold_override "
                            "(--threshold-override) if a clinician approved it")
                    changed.append((name, low, new, new < low))
                    low = new
        if overrides:
            known = [n for n, s in bundle.thresholds.items() if "labels" in s or n == "low_confidence"]
            raise ConfigError(f"unknown threshold(s) {sorted(overrides)}: this bundle defines {known}; fix the "
                              "threshold names in the configuration")
        return cls(bundle.labels, bundle.temperature, tuple(rules), low, bundle.high_risk_labels, tuple(changed))


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Row-wise softmax(logits / T), computed stably in float64 so rows sum to 1."""
    z = np.asarray(logits, np.float64) / temperature
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


@dataclass(frozen=True)
class Triage:
    label: str
    confidence: float
    probabilities: dict[str, float]
    p_high_risk: float
    reasons: tuple[str, ...]
    rules_hit: tuple[str, ...]

    @property
    def needs_review(self) -> bool:
        return bool(self.reasons)


def triage(probs: np.ndarray, policy: Policy, poor_quality: bool = False, disagreement: bool = False,
           out_of_distribution: bool = False) -> Triage:
    """Top label and machine-readable review reasons for one image's calibrated probabilities."""
    p = {lab: float(v) for lab, v in zip(policy.labels, probs, strict=True)}
    top = int(np.argmax(probs))
    hit = tuple(r.name for r in policy.rules if sum(p[x] for x in r.labels) >= r.probability)
    reasons = []
    if hit:
        reasons.append("high_risk")
    if policy.low_confidence is not None and float(probs[top]) < policy.low_confidence:
        reasons.append("low_confidence")
    if poor_quality:
        reasons.append("poor_quality")
    if disagreement:
        reasons.append("model_disagreement")
    if out_of_distribution:  # unlike the training images: the probabilities themselves are not to be trusted
        reasons.append("out_of_distribution")
    return Triage(policy.labels[top], float(probs[top]), p, float(sum(p[x] for x in policy.high_risk_labels)),
                  tuple(reasons), hit)
