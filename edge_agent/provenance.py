"""What a result row was produced under, and the start-up notices when that is not the default.

Why: a result is only as trustworthy as the bundle and thresholds behind it.
Every row records the SHA-256 of the manifest that was verified (so a row can
be traced to the exact signed manifest) and the threshold policy in force;
an unsigned bundle or a local threshold override is announced at every start
with a WARNING line and an `events` row, so neither can go unnoticed in the
journal or in the database.
"""
from __future__ import annotations

import json
from typing import Any

from .bundle import Bundle
from .triage import Policy


def startup_notices(bundle: Bundle, policy: Policy, calibration: Any = None) -> list[tuple[str, str]]:
    """(event kind, message) pairs to log as WARNING and record in `events` at start; empty by default."""
    out: list[tuple[str, str]] = []
    if calibration is not None and calibration.loosened:
        out.append(("calibration_loosened", f"site calibration {calibration.calibration_id} ({calibration.path}) "
                                            f"makes rule(s) {', '.join(calibration.loosened)} LESS STRICT than the "
                                            "bundle's (fewer of the site's images flagged; written with "
                                            "--allow-looser by " f"{calibration.doc.get('created_by')}); policy in force, "
                                            f"recorded in every result row: {policy.to_json()}"))
    sig = bundle.signature
    if sig is not None and not sig.valid:
        why = (f"it is signed by {sig.key_id}, a key this device does not trust" if sig.status == "untrusted"
               else "it has no manifest.sig")
        out.append(("unsigned_bundle", f"running model bundle {bundle.path} ({bundle.model_id}, manifest sha256 "
                                       f"{bundle.manifest_sha256}) WITHOUT a trusted signature ({why}) because "
                                       "allow_unsigned_bundle = true: its thresholds, labels and checksums are not "
                                       "vouched for; sign it (`build-model sign`) and trust the key instead"))
    if policy.overrides:
        parts = [f"{name} {old:g} -> {new:g}{' (LESS STRICT, threshold_override)' if looser else ' (stricter)'}"
                 for name, old, new, looser in policy.overrides]
        out.append(("threshold_override", f"thresholds differ from the bundle's ({'; '.join(parts)}); policy in "
                                          f"force, recorded in every result row: {policy.to_json()}"))
    return out


def policy_event(bundle: Bundle, policy: Policy) -> str:
    """The `policy` event detail: which manifest and which thresholds the results that follow were made with."""
    return json.dumps({"model_id": bundle.model_id, "manifest_sha256": bundle.manifest_sha256,
                       "signature": bundle.signature.to_dict() if bundle.signature else None,
                       "policy": json.loads(policy.to_json())}, separators=(",", ":"))
