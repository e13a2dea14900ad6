"""Drift alarms (issue 13 item 3): daily figures from a real results database, checked against the shipped
bundle's expected ranges; a synthetic shift warns in words (status, log, events), a normal stream does not."""
from __future__ import annotations

import json
import logging
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from edge_agent import drift
from edge_agent.bundle import default_bundle_path
from edge_agent.cli import main
from edge_agent.store import Writer

MANIFEST = json.loads((default_bundle_path() / "manifest.json").read_text())
LABELS = MANIFEST["labels"]


def _day(offset: int) -> datetime:
    return datetime.now(timezone.utc).replace(hour=12, minute=0, second=0, microsecond=0) - timedelta(days=offset)


def _fill(db: Path, days: dict[int, float], per_day: int = 80, seed: int = 0) -> None:
    """Results for each day offset (days ago -> share flagged out_of_distribution); flag rates and class mix
    follow the bundle's test figures, as a site like the training data would."""
    rng = np.random.default_rng(seed)
    counts = MANIFEST["training"]["counts"]["test"]
    mix = np.array([counts[k] for k in LABELS], float)
    mix /= mix.sum()
    w = Writer(db, LABELS)
    n = 0
    with w.transaction():
        w.set_state({"model_path": str(default_bundle_path())})
        for offset, ood_share in days.items():
            for i in range(per_day):
                n += 1
                label = LABELS[rng.choice(len(LABELS), p=mix)]
                rules = ["melanoma", "malignant"] if rng.random() < 0.6 else []
                reasons = (["high_risk"] if rules else []) + (["out_of_distribution"] if i < ood_share * per_day else [])
                at = (_day(offset) + timedelta(seconds=i)).isoformat(timespec="milliseconds").replace("+00:00", "Z")
                w.insert_result({
                    "sha256": f"{n:064x}", "original_name": f"{n}.jpg", "original_path": f"/in/{n}.jpg",
                    "file_state": "moved", "received_at": at, "processed_at": at, "model_id": MANIFEST["model_id"],
                    "model_variant": "int8", "fallback": 0, "label": label, "confidence": 0.8,
                    "probabilities": {k: 1 / len(LABELS) for k in LABELS}, "needs_review": int(bool(reasons)),
                    "review_reasons": ",".join(reasons), "high_risk_rules": ",".join(rules), "quality_issues": "",
                    "ood_score": 3.0 if "out_of_distribution" in reasons else 0.4})
    w.close()


def test_normal_site_gives_no_warning(tmp_path):
    db = tmp_path / "results.db"
    _fill(db, {4: 0.0, 3: 0.01, 2: 0.0, 1: 0.0, 0: 0.01})
    r = CliRunner().invoke(main, ["status", "--db", str(db), "--format", "json"])
    st = json.loads(r.stdout)
    assert st["drift"]["alarms"] == [], st["drift"]["alarms"]
    assert st["drift"]["images"] == 400 and len(st["drift"]["days"]) == 5
    assert not [w for w in st["warnings"] if "training data" in w]


def test_shifted_site_warns_since_the_shift_began(tmp_path):
    db = tmp_path / "results.db"
    _fill(db, {4: 0.0, 3: 0.0, 2: 0.34, 1: 0.35, 0: 0.34}, per_day=100)
    since = _day(2).strftime("%Y-%m-%d")
    r = CliRunner().invoke(main, ["status", "--db", str(db)])
    assert r.exit_code == 1
    want = f"images from this site look unlike the training data since {since}: 34% out of distribution; run edge-agent calibrate"
    assert want in r.output, r.output
    st = json.loads(CliRunner().invoke(main, ["status", "--db", str(db), "--format", "json"]).stdout)
    [alarm] = [a for a in st["drift"]["alarms"] if a["kind"] == "out_of_distribution"]
    assert alarm["since"] == since and alarm["value"] == pytest.approx(0.34, abs=0.01)
    assert st["drift"]["days"][-1]["share_ood"] == pytest.approx(0.34, abs=0.01)
    assert st["drift"]["days"][-1]["mean_ood_score"] == pytest.approx(0.34 * 3.0 + 0.66 * 0.4)


def test_flag_rate_shift_names_the_rule(tmp_path):
    db = tmp_path / "results.db"
    w = Writer(db, LABELS)
    w.close()
    _fill(db, {1: 0.0})
    import sqlite3

    conn = sqlite3.connect(db)  # today: nothing flagged by any rule (the bundle's test data: 58-70%)
    conn.execute("UPDATE results SET high_risk_rules = '', review_reasons = '' WHERE processed_at >= ?",
                 (_day(1).strftime("%Y-%m-%d") + "T",))
    conn.commit()
    figs = drift.figures(conn, MANIFEST)
    conn.close()
    kinds = {a["kind"]: a["message"] for a in figs["alarms"]}
    assert "flag_rate:melanoma" in kinds and "the melanoma rule flags 0% of images" in kinds["flag_rate:melanoma"]


def test_quiet_days_are_not_judged(tmp_path):
    db = tmp_path / "results.db"
    _fill(db, {0: 0.5}, per_day=drift.MIN_IMAGES - 1)
    import sqlite3

    conn = sqlite3.connect(db)
    assert drift.figures(conn, MANIFEST)["alarms"] == []
    conn.close()


def test_daemon_monitor_keeps_daily_figures_and_logs_once(tmp_path, caplog):
    db = tmp_path / "results.db"
    _fill(db, {1: 0.4, 0: 0.4})
    w = Writer(db, LABELS)
    mon = drift.DriftMonitor(MANIFEST)
    with caplog.at_level(logging.WARNING, logger="edge_agent.drift"):
        with w.transaction():
            mon.update(w.conn)
        with w.transaction():
            mon.update(w.conn)  # the same alarm is logged once, not every minute
    stored = w.conn.execute("SELECT day, images, ood, class_mix FROM daily_figures ORDER BY day").fetchall()
    assert [(r[1], r[2]) for r in stored] == [(80, 32), (80, 32)]
    assert sum(json.loads(stored[0][3]).values()) == 80
    assert sum("out of distribution" in m for m in caplog.messages) == 1
    assert w.conn.execute("SELECT count(*) FROM events WHERE kind = 'drift'").fetchone()[0] == 1
    w.close()


def test_expected_ranges_from_the_shipped_manifest_and_defaults():
    exp = drift.expected(MANIFEST)
    lo, hi = exp["rules"]["melanoma"]
    assert lo < 0.58 < hi and abs(sum(exp["class_mix"].values()) - 1) < 1e-9
    assert exp["ood_share"] == pytest.approx(MANIFEST["ood"]["fit"]["variants"]["int8"]["val_flagged"])
    assert exp["ood_share_source"] == "bundle ood.fit.variants.int8.val_flagged" and exp["has_ood"]
    bare = drift.expected({"thresholds": {"melanoma": {"labels": ["mel"], "probability": 0.3}}})
    assert bare["rules"] == {} and bare["class_mix"] is None  # older bundles: documented defaults
    assert bare["ood_share"] == drift.DEFAULT_OOD_SHARE and bare["ood_share_source"] == "default" and not bare["has_ood"]


def test_scan_keeps_daily_figures(fresh_bundle, dirs, example_images):
    from conftest import rows, scan_now, variant_jpegs

    variant_jpegs(example_images, dirs["inbox"], 3)
    (dirs["inbox"] / "junk.jpg").write_bytes(b"not an image at all" * 10)
    code, _ = scan_now(dirs, fresh_bundle)
    got = rows(dirs["db"], "SELECT images, quarantined, class_mix FROM daily_figures")
    assert [(r[0], r[1]) for r in got] == [(3, 1)] and sum(json.loads(got[0][2]).values()) == 3
