"""Drift alarms: daily figures of what the agent sees, checked against what the bundle expects.

Why: a model meets a new dermatoscope, lamp and population at every site, and nothing per image says
"this whole stream is unlike the training data". The daily figures do: images, mean OOD score, share
flagged out_of_distribution, flag rate per high-risk rule, predicted-class mix, quality failures and
quarantines. They are computed from the results table per UTC day (indexed on processed_at, so a refresh
reads one or two days of rows), kept in the `daily_figures` table by the daemon at most once a minute, and
compared with the ranges the bundle's own validation/test figures imply. `edge-agent status`, the log
and monitoring (`figures()`, a plain dict) say in words when and since when they left that range.

Expected ranges (docs/site-calibration.md, "Drift alarms"):
- flag rate of a rule: the bundle's test flag rates (overall and per source) widened by FLAG_MARGIN; a rule
  without recorded flag rates is not checked;
- predicted-class mix: the bundle's test split label mix; alarm when the total variation distance exceeds
  MIX_TV_LIMIT;
- share flagged out_of_distribution: the bundle's validation share (format 3:
  ood.fit.variants.<primary>.val_flagged), else DEFAULT_OOD_SHARE (the issue's acceptance bar for
  in-distribution images); alarm above max(OOD_SHARE_FLOOR, 3 x expected);
- quality: no bundle figure exists; documented defaults POOR_QUALITY_LIMIT and QUARANTINE_LIMIT.
Every rate bound also gets 3 binomial standard errors for the day's image count, and days with fewer
than MIN_IMAGES images are not judged (too noisy), so a quiet day never raises an alarm.
"""
from __future__ import annotations

import json
import logging
import math
import sqlite3
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta, timezone
from typing import Any

log = logging.getLogger(__name__)

MIN_IMAGES = 30
DAYS = 14
FLAG_MARGIN = 0.15
MIX_TV_LIMIT = 0.35
DEFAULT_OOD_SHARE = 0.02
OOD_SHARE_FLOOR = 0.10
POOR_QUALITY_LIMIT = 0.25
QUARANTINE_LIMIT = 0.10
REFRESH_SECONDS = 60.0


@dataclass
class Day:
    """One UTC day's figures."""

    day: str
    images: int = 0
    quarantined: int = 0
    poor_quality: int = 0
    flagged: int = 0
    ood: int = 0
    mean_ood_score: float | None = None
    rule_flags: dict[str, int] | None = None
    class_mix: dict[str, int] | None = None

    def share(self, n: int) -> float:
        return n / self.images if self.images else 0.0


def _today() -> datetime:
    return datetime.now(timezone.utc)


def _since(days: int, now: datetime | None = None) -> str:
    return ((now or _today()) - timedelta(days=days - 1)).strftime("%Y-%m-%d")


def has_column(conn: sqlite3.Connection, table: str, column: str) -> bool:
    return any(r[1] == column for r in conn.execute(f"PRAGMA table_info({table})"))


_DAY_SQL = ("SELECT substr(processed_at, 1, 10) AS d, count(*), sum(needs_review), "
            "sum(instr(review_reasons, 'poor_quality') > 0), sum(instr(review_reasons, 'out_of_distribution') > 0), "
            "NULL FROM results WHERE processed_at >= ? GROUP BY d")
_DAY_SQL_OOD = ("SELECT substr(processed_at, 1, 10) AS d, count(*), sum(needs_review), "
                "sum(instr(review_reasons, 'poor_quality') > 0), sum(instr(review_reasons, 'out_of_distribution') > 0), "
                "avg(ood_score) FROM results WHERE processed_at >= ? GROUP BY d")


def compute(conn: sqlite3.Connection, since_day: str) -> list[Day]:
    """Figures per UTC day from `since_day` on, straight from results and quarantine (oldest first)."""
    out: dict[str, Day] = {}

    def day(d: str) -> Day:
        if d not in out:
            out[d] = Day(d, rule_flags={}, class_mix={})
        return out[d]

    since = since_day + "T"  # processed_at is ISO UTC with a fixed width: text order is time order
    # Two constant statements (no SQL built from strings): results carry ood_score only with OOD bundles' schema.
    sql = _DAY_SQL_OOD if has_column(conn, "results", "ood_score") else _DAY_SQL
    for r in conn.execute(sql, (since,)):
        x = day(r[0])
        x.images, x.flagged, x.poor_quality, x.ood = int(r[1]), int(r[2] or 0), int(r[3] or 0), int(r[4] or 0)
        x.mean_ood_score = None if r[5] is None else round(float(r[5]), 6)
    for d, rules, n in conn.execute(
            "SELECT substr(processed_at, 1, 10) AS d, high_risk_rules, count(*) FROM results "
            "WHERE processed_at >= ? AND high_risk_rules != '' GROUP BY d, high_risk_rules", (since,)):
        flags = day(d).rule_flags
        assert flags is not None
        for rule in str(rules).split(","):
            flags[rule] = flags.get(rule, 0) + int(n)
    for d, label, n in conn.execute(
            "SELECT substr(processed_at, 1, 10) AS d, label, count(*) FROM results WHERE processed_at >= ? "
            "GROUP BY d, label", (since,)):
        mix = day(d).class_mix
        assert mix is not None
        mix[str(label)] = int(n)
    for d, n in conn.execute("SELECT substr(quarantined_at, 1, 10) AS d, count(*) FROM quarantine "
                             "WHERE quarantined_at >= ? GROUP BY d", (since,)):
        day(d).quarantined = int(n)
    return [out[k] for k in sorted(out)]


def refresh(conn: sqlite3.Connection, days: int = 2) -> list[Day]:
    """Recompute the last `days` UTC days into `daily_figures` (the writer's connection, inside its transaction)."""
    figs = compute(conn, _since(days))
    now = datetime.now(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")
    conn.executemany(
        "INSERT OR REPLACE INTO daily_figures (day, images, quarantined, poor_quality, flagged, ood, mean_ood_score, "
        "rule_flags, class_mix, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        [(d.day, d.images, d.quarantined, d.poor_quality, d.flagged, d.ood, d.mean_ood_score,
          json.dumps(d.rule_flags, sort_keys=True), json.dumps(d.class_mix, sort_keys=True), now) for d in figs])
    return figs


# --- what the bundle expects ---------------------------------------------------------------------

def _rate(x: Any) -> float | None:
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) and 0 <= x <= 1 else None


def expected(manifest: dict[str, Any] | None) -> dict[str, Any]:
    """Expected ranges from a bundle manifest (and the documented defaults where it records nothing)."""
    m = manifest if isinstance(manifest, dict) else {}
    out: dict[str, Any] = {"rules": {}, "class_mix": None, "ood_share": DEFAULT_OOD_SHARE,
                           "ood_share_source": "default", "poor_quality_max": POOR_QUALITY_LIMIT,
                           "quarantine_max": QUARANTINE_LIMIT, "has_ood": False}
    ths = m.get("thresholds") if isinstance(m.get("thresholds"), dict) else {}
    for name, spec in ths.items():
        if not isinstance(spec, dict) or "labels" not in spec:
            continue
        rates = [_rate(spec.get("test_flag_rate"))]
        by = spec.get("test_by_source")
        if isinstance(by, dict):
            rates += [_rate(v.get("flag_rate")) for v in by.values() if isinstance(v, dict)]
        rates = [r for r in rates if r is not None]
        if rates:
            out["rules"][name] = [max(0.0, min(rates) - FLAG_MARGIN), min(1.0, max(rates) + FLAG_MARGIN)]
    counts = (m.get("training") or {}).get("counts", {}).get("test") if isinstance(m.get("training"), dict) else None
    if isinstance(counts, dict) and counts:
        total = sum(v for v in counts.values() if isinstance(v, (int, float)))
        if total > 0:
            out["class_mix"] = {k: v / total for k, v in counts.items() if isinstance(v, (int, float))}
    ood = m.get("ood") if isinstance(m.get("ood"), dict) else None
    if ood is not None:  # bundle format 3: ood.fit.variants.<variant>.val_flagged / val_median (build-model)
        out["has_ood"] = True
        fit = ood.get("fit") if isinstance(ood.get("fit"), dict) else {}
        variants = fit.get("variants") if isinstance(fit.get("variants"), dict) else {}
        primary = m.get("primary")
        order = [primary] + [v for v in variants if v != primary] if primary in variants else list(variants)
        for v in order:
            spec = variants.get(v) if isinstance(variants.get(v), dict) else {}
            share = _rate(spec.get("val_flagged"))
            if share is not None:
                out["ood_share"], out["ood_share_source"] = share, f"bundle ood.fit.variants.{v}.val_flagged"
                med = spec.get("val_median")
                out["ood_score_val_median"] = float(med) if isinstance(med, (int, float)) else None
                break
    return out


# --- alarms --------------------------------------------------------------------------------------

@dataclass
class Alarm:
    kind: str      # out_of_distribution | flag_rate:<rule> | class_mix | quality | quarantine
    since: str     # first day of the current run of days out of range
    value: float   # the latest judged day's figure
    message: str


def _noise(p: float, n: int) -> float:
    return 3.0 * math.sqrt(max(p * (1 - p), 0.01 * 0.99) / max(n, 1))


def _checks(d: Day, exp: dict[str, Any]) -> dict[str, tuple[float, str]]:
    """The figures of one day that are out of range: kind -> (value, what it means, in words)."""
    n = d.images + d.quarantined
    bad: dict[str, tuple[float, str]] = {}
    if d.images:
        share = d.share(d.ood)
        limit = max(OOD_SHARE_FLOOR, 3 * exp["ood_share"])
        if share > limit + _noise(limit, d.images):
            bad["out_of_distribution"] = (share, f"{share:.0%} out of distribution")
        for rule, (lo, hi) in exp["rules"].items():
            rate = d.share((d.rule_flags or {}).get(rule, 0))
            if rate > hi + _noise(hi, d.images) or rate < lo - _noise(lo, d.images):
                bad[f"flag_rate:{rule}"] = (rate, f"the {rule} rule flags {rate:.0%} of images (the bundle's test "
                                                  f"data: {lo + FLAG_MARGIN:.0%}-{hi - FLAG_MARGIN:.0%})")
        if exp["class_mix"]:
            mix = {k: v / d.images for k, v in (d.class_mix or {}).items()}
            keys = set(mix) | set(exp["class_mix"])
            tv = 0.5 * sum(abs(mix.get(k, 0.0) - exp["class_mix"].get(k, 0.0)) for k in keys)
            if tv > MIX_TV_LIMIT + _noise(0.5, d.images):
                top = sorted(keys, key=lambda k: -abs(mix.get(k, 0.0) - exp["class_mix"].get(k, 0.0)))[:2]
                what = ", ".join(f"{k} {mix.get(k, 0.0):.0%} (training {exp['class_mix'].get(k, 0.0):.0%})" for k in top)
                bad["class_mix"] = (tv, f"the predicted diagnoses differ from the training mix ({what})")
        pq = d.share(d.poor_quality)
        if pq > exp["poor_quality_max"] + _noise(exp["poor_quality_max"], d.images):
            bad["quality"] = (pq, f"{pq:.0%} of images failed the quality check (blurred, too dark or overexposed)")
    if n:
        q = d.quarantined / n
        if q > exp["quarantine_max"] + _noise(exp["quarantine_max"], n):
            bad["quarantine"] = (q, f"{q:.0%} of files were quarantined (not screenable)")
    return bad


ALARM_KINDS = ("out_of_distribution", "class_mix", "quality", "quarantine")  # and "flag_rate:<rule>"
ADVICE = {"out_of_distribution": "images from this site look unlike the training data",
          "class_mix": "images from this site look unlike the training data",
          "quality": "image quality dropped", "quarantine": "many files cannot be screened"}


def alarms(days: list[Day], exp: dict[str, Any]) -> list[Alarm]:
    """Alarms whose figure is out of range on the latest judged day (>= MIN_IMAGES), with the day the run of
    out-of-range judged days began."""
    judged = [d for d in days if d.images >= MIN_IMAGES]
    if not judged:
        return []
    per_day = [(d, _checks(d, exp)) for d in judged]
    out = []
    for kind, (value, what) in per_day[-1][1].items():
        since = per_day[-1][0].day
        for d, bad in reversed(per_day[:-1]):
            if kind not in bad:
                break
            since = d.day
        if kind.startswith("flag_rate:"):
            msg = (f"the images from this site are scored unlike the training data since {since}: {what}; the "
                   "review thresholds may not hold their sensitivity here - run edge-agent calibrate on labelled cases")
        elif kind in ("quality", "quarantine"):
            msg = (f"{ADVICE[kind]} since {since}: {what}; check the dermatoscope (lens, light, focus) and how images "
                   "are exported")
        else:
            msg = f"{ADVICE[kind]} since {since}: {what}; run edge-agent calibrate"
        out.append(Alarm(kind, since, round(value, 4), msg))
    return out


def figures(conn: sqlite3.Connection, manifest: dict[str, Any] | None, days: int = DAYS) -> dict[str, Any]:
    """The drift figures for monitoring and `status`: the last `days` UTC days, totals, expected ranges, alarms.

    Computed from results directly (read-only, cheap: indexed by processed_at), so it is current even
    when no daemon keeps `daily_figures`."""
    figs = compute(conn, _since(days))
    exp = expected(manifest)
    total = sum(d.images for d in figs)
    ood_days = [d for d in figs if d.mean_ood_score is not None]
    mean_ood = (sum(d.mean_ood_score * d.images for d in ood_days) / max(1, sum(d.images for d in ood_days))
                if ood_days else None)
    rules: dict[str, int] = defaultdict(int)
    for d in figs:
        for k, v in (d.rule_flags or {}).items():
            rules[k] += v
    return {
        "days": [{**asdict(d), "share_ood": round(d.share(d.ood), 4),
                  "flag_rate": {k: round(v / d.images, 4) for k, v in (d.rule_flags or {}).items()} if d.images else {}}
                 for d in figs],
        "window_days": days,
        "images": total,
        "mean_ood_score": None if mean_ood is None else round(mean_ood, 6),
        "share_ood": round(sum(d.ood for d in figs) / total, 4) if total else None,
        "flag_rate": {k: round(v / total, 4) for k, v in sorted(rules.items())} if total else {},
        "quarantined": sum(d.quarantined for d in figs),
        "poor_quality": sum(d.poor_quality for d in figs),
        "expected": exp,
        "min_images_per_day": MIN_IMAGES,
        "alarms": [asdict(a) for a in alarms(figs, exp)],
    }


class DriftMonitor:
    """Kept by the daemon: refresh `daily_figures` at most once a minute (from the writer thread, inside its
    transaction) and log each alarm once when it starts (WARNING and an events row `drift`)."""

    def __init__(self, manifest: dict[str, Any] | Callable[[], dict[str, Any]]) -> None:
        # a callable: the manifest of the model in use now (a model swap changes the expected ranges)
        self.manifest = manifest if callable(manifest) else (lambda: manifest)
        self.active: set[str] = set()
        self.today: Day | None = None  # the latest day's figures, for the metrics file (metrics.py)
        self.last = 0.0
        self.failed = False

    def due(self) -> bool:
        return time.monotonic() - self.last >= REFRESH_SECONDS

    def update(self, conn: sqlite3.Connection) -> None:
        self.last = time.monotonic()
        try:
            refresh(conn)
            figs = compute(conn, _since(DAYS))
            current = alarms(figs, expected(self.manifest()))
        except sqlite3.Error as e:  # never let the figures hold up a commit
            if not self.failed:
                log.warning("cannot update the drift figures (%s); screening continues", e)
            self.failed = True
            return
        self.failed = False
        self.today = figs[-1] if figs else None
        for a in current:
            if a.kind not in self.active:
                log.warning("%s", a.message)
                conn.execute("INSERT INTO events (at, kind, detail) VALUES (?, 'drift', ?)",
                             (datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
                              a.message))
        self.active = {a.kind for a in current}


def load_manifest(bundle_path: str | None) -> dict[str, Any] | None:
    """The manifest's expectations, read without verifying the bundle (status only compares numbers)."""
    from pathlib import Path

    from .bundle import default_bundle_path

    path = Path(bundle_path) if bundle_path else default_bundle_path()
    try:
        m = json.loads((path / "manifest.json").read_text())
    except (OSError, ValueError):
        return None
    return m if isinstance(m, dict) else None


def figures_for_db(conn: sqlite3.Connection) -> dict[str, Any]:
    """drift figures for monitoring, given a read-only connection: the bundle is the one the agent last posted
    (agent_state.model_path), else the packaged one."""
    row = conn.execute("SELECT value FROM agent_state WHERE key = 'model_path'").fetchone()
    return figures(conn, load_manifest(row[0] if row else None))
