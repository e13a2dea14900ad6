"""What `edge-agent scan` reports when it ends: one summary, as text for a person or JSON for a script.

Why a module: the summary is the one-shot command's product (a cron job or an import script reads it to know
what happened to each file it dropped), so it is built once as data and rendered twice, instead of being
assembled from echo calls in the CLI; a script that parsed the text would break at every rewording.
"""
from __future__ import annotations

import json
from typing import Any

from . import log as logsetup

SHOWN = 20  # the text lists at most this many quarantined / waiting files; JSON lists them all


def build(counts: Any, elapsed_s: float, quarantined: list[tuple[str, str]],
          left: list[tuple[str, str, float]], hidden: list[str], partial_timeout_s: float, exit_code: int
          ) -> dict[str, Any]:
    """The scan's outcome as plain data. `left` is Agent.left_in_inbox(): (name, why, seconds since change)."""
    handled = counts.results + counts.duplicates + counts.quarantined
    elapsed_s = max(elapsed_s, 1e-6)
    return {
        "exit_code": exit_code,
        "complete": exit_code == 0,
        "elapsed_s": round(elapsed_s, 3),
        "images_per_s": round(handled / elapsed_s, 2),
        "counts": {"processed": counts.results, "flagged": counts.flagged, "quarantined": counts.quarantined,
                   "duplicates": counts.duplicates, "already_recorded": counts.already_done,
                   "vanished": counts.vanished, "model_fallbacks": counts.fallbacks},
        "quarantined": [{"file": rel, "reason": reason} for rel, reason in quarantined],
        "left_in_inbox": [{"file": rel, "why": why, "changed_s_ago": round(age, 1)} for rel, why, age in left],
        "hidden_files": len(hidden),
        "partial_timeout_s": partial_timeout_s,
    }


def text(r: dict[str, Any], hidden_example: str | None = None) -> list[str]:
    """The summary a person reads (names escaped: a file name can hold control characters)."""
    c = r["counts"]
    lines = [f"screened the inbox in {r['elapsed_s']:.1f} s ({r['images_per_s']:.1f} images/s)"]
    for label, key in (("processed", "processed"), ("flagged for review", "flagged"), ("quarantined", "quarantined"),
                       ("duplicates skipped", "duplicates"), ("already recorded", "already_recorded"),
                       ("vanished before reading", "vanished"), ("model fallbacks", "model_fallbacks")):
        if c[key] or key in ("processed", "flagged", "quarantined", "duplicates"):
            lines.append(f"  {label + ':':<26}{c[key]}")
    q = r["quarantined"]
    lines += [f"  quarantined {logsetup.printable(x['file'])}: {logsetup.printable(x['reason'])}" for x in q[:SHOWN]]
    if len(q) > SHOWN:
        lines.append(f"  ... and {len(q) - SHOWN} more (see `edge-agent quarantine`)")
    left = r["left_in_inbox"]
    for x in left[:SHOWN]:
        name, why = logsetup.printable(x["file"]), x["why"]
        if why.startswith("cannot list"):  # a folder the agent cannot enter (intake.unlisted)
            lines.append(f"  left in the inbox: {name} ({why})")
            continue
        what = "temporary upload name, waits for its rename" if why == "temporary name" else \
            f"{why}: possibly still being copied"
        lines.append(f"  left in the inbox: {name} ({what}; changed {x['changed_s_ago']:.0f} s ago)")
    if len(left) > SHOWN:
        lines.append(f"  ... and {len(left) - SHOWN} more left in the inbox (see `edge-agent status`)")
    if any(not x["why"].startswith("cannot list") for x in left):
        lines.append(f"  files that look incomplete are quarantined once unchanged for {r['partial_timeout_s']:g} s "
                     "(partial_timeout_seconds), as `run` does; run scan again after the copy has finished")
    n = r["hidden_files"]
    if n:  # never screened by design (._* from macOS, .DS_Store, dot-named uploads): say so, once
        example = f", e.g. {logsetup.printable(hidden_example)}" if hidden_example else ""
        lines.append(f"  left alone: {n}{'+' if n >= 1000 else ''} hidden file(s) (names starting with a dot"
                     f"{example}); rename without the dot to screen them")
    return lines


def as_json(r: dict[str, Any]) -> str:
    """ASCII JSON: a name with bytes that are not UTF-8 (a lone surrogate from os.fsdecode) stays a valid
    escape (\\udcXX, which json.loads and os.fsencode turn back into the original bytes) instead of failing."""
    return json.dumps(r, indent=2)
