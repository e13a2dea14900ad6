"""The validation gate: may the INT8 model ship in place of FP32?

Judged on the held-out test split, FP32 and INT8 side by side. The limits are
the product's promise (no clinically visible loss from quantization), so they
are constants here and their values are written into the manifest with the
verdict.
"""
from __future__ import annotations

import numpy as np

from .calibrate import risk_score, sens_spec
from .metrics import softmax, summarize

MAX_BALANCED_ACC_DROP = 0.010   # 1.0 point
MAX_MEL_SENS_DROP = 0.010       # 1.0 point
MIN_AGREEMENT = 0.99


def compare(fp32_logits: np.ndarray, int8_logits: np.ndarray, y: np.ndarray, labels: list[str],
            temperature: float = 1.0, mel_threshold: float | None = None) -> dict:
    pf, pq = softmax(fp32_logits, temperature), softmax(int8_logits, temperature)
    f, q = summarize(y, pf, labels), summarize(y, pq, labels)
    agreement = float((pf.argmax(1) == pq.argmax(1)).mean())
    out = {"fp32": f, "int8": q, "agreement": agreement,
           "balanced_accuracy_drop": f["balanced_accuracy"] - q["balanced_accuracy"]}
    if "mel" in labels:
        out["mel_sensitivity_drop"] = f["per_class"]["mel"]["sensitivity"] - q["per_class"]["mel"]["sensitivity"]
        if mel_threshold is not None:
            pos = y == labels.index("mel")
            sf, _ = sens_spec(pos, risk_score(pf, labels, ["mel"]) >= mel_threshold)
            sq, _ = sens_spec(pos, risk_score(pq, labels, ["mel"]) >= mel_threshold)
            out["mel_sensitivity_at_threshold"] = {"fp32": sf, "int8": sq}
            out["mel_sensitivity_drop"] = max(out["mel_sensitivity_drop"], sf - sq)
    return out


def verdict(cmp: dict) -> tuple[bool, str]:
    problems = []
    if cmp["balanced_accuracy_drop"] > MAX_BALANCED_ACC_DROP:
        problems.append(f"balanced accuracy dropped {100 * cmp['balanced_accuracy_drop']:.2f} points (limit {100 * MAX_BALANCED_ACC_DROP:.1f})")
    if cmp.get("mel_sensitivity_drop", 0.0) > MAX_MEL_SENS_DROP:
        problems.append(f"melanoma sensitivity dropped {100 * cmp['mel_sensitivity_drop']:.2f} points (limit {100 * MAX_MEL_SENS_DROP:.1f})")
    if cmp["agreement"] < MIN_AGREEMENT:
        problems.append(f"top-1 agreement {100 * cmp['agreement']:.2f}% (minimum {100 * MIN_AGREEMENT:.0f}%)")
    if problems:
        return False, "; ".join(problems)
    return True, (f"balanced-accuracy drop {100 * cmp['balanced_accuracy_drop']:+.2f} pt, melanoma sensitivity drop "
                  f"{100 * cmp.get('mel_sensitivity_drop', 0):+.2f} pt, agreement {100 * cmp['agreement']:.2f}%: within limits")


LIMITS = {"max_balanced_accuracy_drop": MAX_BALANCED_ACC_DROP, "max_mel_sensitivity_drop": MAX_MEL_SENS_DROP,
          "min_agreement": MIN_AGREEMENT}
