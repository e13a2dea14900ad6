"""Site calibration (issue 13 item 1): the arithmetic on synthetic scores with known answers, the refusal
for too few positives, the file's checksum and model-id binding, the agent honouring it (rows carry the
calibration id), and every bad calibration input (unknown labels, missing files, duplicate rows,
images the agent quarantines, a file for another model id, a tampered file)."""
from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from conftest import rows, scan_now, settings_for, variant_jpegs
from edge_agent.bundle import load_bundle
from edge_agent.calibration_math import (bootstrap_ci, fit_temperature, logits_from_probabilities, min_positives,
                                         softmax, threshold_for_sensitivity)
from edge_agent.cli import main
from edge_agent.site_calibration import (CalibrationError, Cases, TooFewPositives, check_positives, default_path,
                                         fit, load_calibration, seal)


# --- arithmetic ------------------------------------------------------------------------------------

def test_threshold_for_sensitivity_known_answer():
    score = np.arange(1, 101) / 100.0            # 0.01 .. 1.00
    positive = score > 0.80                       # 20 positives: 0.81 .. 1.00
    # 95% of 20 = 19 positives at or above t: the 19th highest positive score is 0.82
    assert threshold_for_sensitivity(score, positive, 0.95) == pytest.approx(0.82)
    assert threshold_for_sensitivity(score, positive, 1.0) == pytest.approx(0.81)


def test_fit_temperature_recovers_known_temperature():
    rng = np.random.default_rng(1)
    z = rng.normal(0, 3, size=(4000, 5))
    p = softmax(z, 2.0)
    y = np.array([rng.choice(5, p=row) for row in p])
    assert fit_temperature(z, y) == pytest.approx(2.0, rel=0.1)


def test_logits_recovered_from_probabilities_give_any_temperature():
    z = np.random.default_rng(2).normal(0, 2, size=(50, 7))
    stored = softmax(z, 1.5)
    back = logits_from_probabilities(stored, 1.5)
    np.testing.assert_allclose(softmax(back, 0.7), softmax(z, 0.7), atol=1e-9)


def test_min_positives_and_bootstrap_interval():
    assert min_positives(0.95) == 20 and min_positives(0.90) == 10
    values = np.r_[np.zeros(50), np.ones(50)]
    lo, hi = bootstrap_ci(lambda i: float(values[i].mean()), 100, reps=500, seed=0)
    assert lo < 0.5 < hi and 0.35 < lo and hi < 0.65


def test_build_model_still_exports_the_moved_functions():
    from build_model import calibrate

    assert calibrate.fit_temperature is fit_temperature and calibrate.threshold_for_sensitivity is threshold_for_sensitivity


# --- fit on synthetic cases with a real (tiny) bundle ----------------------------------------------

def _cases(bundle, n_mel: int, n_nv: int, mel_logit: float, nv_mel_logit: float) -> Cases:
    labels = list(bundle.labels)
    z = np.zeros((n_mel + n_nv, len(labels)))
    z[:n_mel, labels.index("mel")] = mel_logit + np.linspace(0, 1, n_mel)
    z[n_mel:, labels.index("nv")] = 3.0
    z[n_mel:, labels.index("mel")] = nv_mel_logit + np.linspace(0, 1, n_nv)
    y = np.r_[np.full(n_mel, labels.index("mel")), np.full(n_nv, labels.index("nv"))]
    return Cases(z, y, "synthetic")


def test_too_few_positives_refused_naming_how_many_more(fresh_bundle):
    b = load_bundle(fresh_bundle)
    with pytest.raises(TooFewPositives) as e:
        check_positives(_cases(b, 12, 40, 4.0, 0.0), b)
    assert "12 positive case(s), at least 20 needed" in str(e.value) and "label 8 more" in str(e.value)


def test_fit_reaches_target_and_keeps_stricter_unless_allowed(fresh_bundle):
    b = load_bundle(fresh_bundle)
    # Negatives score well above the bundle's 0.3 melanoma threshold: the bundle flags everything; the site's
    # 95% threshold would flag fewer - looser, so without --allow-looser the bundle's flag count is kept.
    cases = _cases(b, 40, 60, 6.0, 2.5)
    r = fit(cases, b, reps=200)
    mel = r["thresholds"]["melanoma"]
    assert mel["looser"] is False and "allow-looser" in mel["note"]
    assert mel["site_calibrated"]["flag_rate"] >= mel["site_with_bundle"]["flag_rate"]
    assert r["loosened"] == []
    loose = fit(cases, b, reps=200, allow_looser=True)
    assert "melanoma" in loose["loosened"] and loose["thresholds"]["melanoma"]["site_calibrated"]["sensitivity"] >= 0.95
    for key in ("ci95", "site_calibrated", "site_with_bundle"):
        assert key in mel
    assert len(r["temperature"]["ci95"]) == 2 and all(v is not None for v in r["temperature"]["ci95"])


# --- the file --------------------------------------------------------------------------------------

def _doc(bundle, **over) -> dict:
    doc = {"format": "edge-agent-site-calibration", "format_version": 1, "model_id": bundle.model_id,
           "created_at": "2026-12-01T10:00:00.000Z", "created_by": "test",
           "temperature": {"value": 1.0, "ci95": [0.9, 1.1], "bundle": bundle.temperature},
           "thresholds": {"melanoma": {"probability": 0.0, "labels": ["mel"]},
                          "malignant": {"probability": 0.5, "labels": ["mel", "bcc", "akiec"]}},
           "loosened": [], "data": {"cases": 0, "source": "test"}}
    doc.update(over)
    return seal(doc)


def test_checksum_and_model_id_binding(fresh_bundle, tmp_path):
    b = load_bundle(fresh_bundle)
    path = tmp_path / "cal.json"
    path.write_text(json.dumps(_doc(b)))
    assert load_calibration(path, b).thresholds["melanoma"] == 0.0
    other = tmp_path / "other.json"
    other.write_text(json.dumps(_doc(b, model_id="some-other-model-1234")))
    with pytest.raises(CalibrationError, match="was made for model 'some-other-model-1234'"):
        load_calibration(other, b)
    tampered = json.loads(path.read_text())
    tampered["thresholds"]["melanoma"]["probability"] = 0.9
    path.write_text(json.dumps(tampered))
    with pytest.raises(CalibrationError, match="fails its checksum"):
        load_calibration(path, b)


def _scan_env(dirs, bundle, example_images, n=4):
    variant_jpegs(example_images, dirs["inbox"], n)


def test_agent_applies_calibration_and_rows_carry_its_id(fresh_bundle, dirs, example_images):
    b = load_bundle(fresh_bundle)
    doc = _doc(b)
    default_path(fresh_bundle).write_text(json.dumps(doc))
    _scan_env(dirs, fresh_bundle, example_images)
    code, agent = scan_now(dirs, fresh_bundle)
    assert code == 0
    got = rows(dirs["db"], "SELECT calibration_id, high_risk_rules, policy FROM results")
    assert len(got) == 4
    assert {r["calibration_id"] for r in got} == {doc["calibration_id"]}
    assert all("melanoma" in r["high_risk_rules"] for r in got)  # the calibration's threshold 0.0 flags all
    pol = json.loads(got[0]["policy"])
    assert pol["calibration"] == doc["calibration_id"] and pol["temperature"] == 1.0
    st = json.loads(CliRunner().invoke(main, ["status", "--db", str(dirs["db"]), "--format", "json"]).stdout)
    assert st["calibration_id"] == doc["calibration_id"]


def test_without_calibration_rows_record_none(fresh_bundle, dirs, example_images):
    _scan_env(dirs, fresh_bundle, example_images, 2)
    scan_now(dirs, fresh_bundle)
    assert {r[0] for r in rows(dirs["db"], "SELECT calibration_id FROM results")} == {None}


@pytest.mark.parametrize("case", ["other_model", "tampered"])
def test_agent_refuses_bad_calibration_file_exit_2(fresh_bundle, dirs, example_images, case):
    b = load_bundle(fresh_bundle)
    doc = _doc(b, model_id="some-other-model-1234") if case == "other_model" else _doc(b)
    if case == "tampered":
        doc["temperature"]["value"] = 3.0
    default_path(fresh_bundle).write_text(json.dumps(doc))
    _scan_env(dirs, fresh_bundle, example_images, 2)
    s = settings_for(dirs, fresh_bundle)
    r = CliRunner().invoke(main, ["scan", "--inbox", str(s.inbox), "--db", str(s.db), "--model", str(fresh_bundle),
                                  "--workers", "1", "--threads", "1", "--quiet-seconds", "0"])
    assert r.exit_code == 2, r.output
    assert ("was made for model" if case == "other_model" else "fails its checksum") in r.output
    assert len(list(dirs["inbox"].iterdir())) == 2  # nothing screened


def test_loosened_calibration_is_announced_at_start(fresh_bundle, dirs, example_images, caplog):
    b = load_bundle(fresh_bundle)
    default_path(fresh_bundle).write_text(json.dumps(_doc(b, loosened=["malignant"])))
    _scan_env(dirs, fresh_bundle, example_images, 1)
    with caplog.at_level("WARNING"):
        scan_now(dirs, fresh_bundle)
    assert any("LESS STRICT" in m for m in caplog.messages)
    ev = rows(dirs["db"], "SELECT detail FROM events WHERE kind = 'calibration_loosened'")
    assert len(ev) == 1 and "malignant" in ev[0][0]


# --- the command and its bad inputs ------------------------------------------------------------------

def _site(tmp_path, example_images, n_mel=22, n_nv=22):
    imgs = variant_jpegs(example_images, tmp_path / "cases", n_mel + n_nv)
    lines = ["file,label"] + [f"{p.name},{'melanoma' if i < n_mel else 'nv'}" for i, p in enumerate(imgs)]
    return tmp_path / "cases", lines


def _calibrate(csv: Path, bundle: Path, *extra: str):
    return CliRunner().invoke(main, ["calibrate", "--csv", str(csv), "--model", str(bundle), "--bootstrap", "200",
                                     "--by", "Dr Test", *extra])


def test_calibrate_csv_writes_verified_file_with_intervals(fresh_bundle, tmp_path, example_images):
    folder, lines = _site(tmp_path, example_images)
    (folder / "site.csv").write_text("\n".join(lines) + "\n")
    r = _calibrate(folder / "site.csv", fresh_bundle)
    assert r.exit_code == 0, r.output
    path = default_path(fresh_bundle)
    assert f"wrote {path}" in r.output and "temperature:" in r.output and "[" in r.output
    cal = load_calibration(path, load_bundle(fresh_bundle))
    assert cal.doc["created_by"] == "Dr Test" and cal.doc["data"]["cases"] == 44
    assert cal.doc["data"]["by_label"] == {"mel": 22, "nv": 22}
    assert not list(fresh_bundle.parent.glob(".*.tmp"))  # written via a temporary file and rename
    info = CliRunner().invoke(main, ["model", "info", str(fresh_bundle)])
    assert info.exit_code == 0, info.output
    assert cal.calibration_id in info.output and "(bundle 0.3)" in info.output


def test_calibrate_too_few_positives_exit_1_nothing_written(fresh_bundle, tmp_path, example_images):
    folder, lines = _site(tmp_path, example_images, n_mel=5, n_nv=10)
    (folder / "site.csv").write_text("\n".join(lines) + "\n")
    r = _calibrate(folder / "site.csv", fresh_bundle)
    assert r.exit_code == 1 and "label 15 more" in r.output
    assert not default_path(fresh_bundle).exists()


def test_calibrate_unknown_labels(fresh_bundle, tmp_path, example_images):
    folder, lines = _site(tmp_path, example_images)
    lines[3] = lines[3].split(",")[0] + ",melanomma"
    (folder / "site.csv").write_text("\n".join(lines) + "\n")
    r = _calibrate(folder / "site.csv", fresh_bundle)
    assert r.exit_code == 2 and "does not know (line 4: 'melanomma')" in r.output and "mel (Melanoma)" in r.output
    assert not default_path(fresh_bundle).exists()


def test_calibrate_missing_files(fresh_bundle, tmp_path, example_images):
    folder, lines = _site(tmp_path, example_images)
    lines.append("gone.jpg,nv")
    (folder / "site.csv").write_text("\n".join(lines) + "\n")
    r = _calibrate(folder / "site.csv", fresh_bundle)
    assert r.exit_code == 2 and "do not exist (line 46: gone.jpg)" in r.output
    assert not default_path(fresh_bundle).exists()


def test_calibrate_duplicate_rows(fresh_bundle, tmp_path, example_images):
    folder, lines = _site(tmp_path, example_images)
    (folder / "site.csv").write_text("\n".join(lines + [lines[1]]) + "\n")  # identical repeat: counted once
    r = _calibrate(folder / "site.csv", fresh_bundle)
    assert r.exit_code == 0, r.output
    assert "1 repeated line(s) in the CSV counted once" in r.output
    assert load_calibration(default_path(fresh_bundle), load_bundle(fresh_bundle)).doc["data"]["cases"] == 44
    conflict = lines + [lines[1].split(",")[0] + ",nv"]  # same file, another verdict: refused
    (folder / "site.csv").write_text("\n".join(conflict) + "\n")
    before = default_path(fresh_bundle).read_bytes()
    r = _calibrate(folder / "site.csv", fresh_bundle)
    assert r.exit_code == 2 and "listed with two different labels" in r.output
    assert default_path(fresh_bundle).read_bytes() == before  # the earlier file is untouched


def test_calibrate_reports_images_the_agent_quarantines(fresh_bundle, tmp_path, example_images):
    folder, lines = _site(tmp_path, example_images)
    (folder / "notes.jpg").write_bytes(b"this is a text file, not an image\n" * 20)
    (folder / "half.jpg").write_bytes((folder / lines[1].split(",")[0]).read_bytes()[:3000])
    (folder / "site.csv").write_text("\n".join(lines + ["notes.jpg,nv", "half.jpg,nv"]) + "\n")
    r = _calibrate(folder / "site.csv", fresh_bundle)
    assert r.exit_code == 0, r.output
    assert "left out" in r.output and "notes.jpg" in r.output and "half.jpg" in r.output
    assert "2 case(s) left out" in r.output
    doc = load_calibration(default_path(fresh_bundle), load_bundle(fresh_bundle)).doc
    assert doc["data"]["cases"] == 44 and doc["data"]["excluded"] == 2


def test_calibrate_from_reviews_without_verdicts_is_a_clear_error(fresh_bundle, dirs, example_images):
    _scan_env(dirs, fresh_bundle, example_images, 2)
    scan_now(dirs, fresh_bundle)
    r = CliRunner().invoke(main, ["calibrate", "--from-reviews", "--db", str(dirs["db"]), "--model", str(fresh_bundle)])
    assert r.exit_code == 2 and "no `reviews` table" in r.output


def test_calibrate_from_reviews_uses_recorded_verdicts(fresh_bundle, dirs, example_images):
    variant_jpegs(example_images, dirs["inbox"], 44)
    scan_now(dirs, fresh_bundle)
    conn = sqlite3.connect(dirs["db"])  # the review app's table (store migration 6)
    ids = [r for r in conn.execute("SELECT id, sha256 FROM results ORDER BY id")]
    for k, (rid, sha) in enumerate(ids):
        histo = "mel" if k < 22 else ("compound nevus, no atypia" if k % 2 else "")  # free text: diagnosis counts
        conn.execute("INSERT INTO reviews (result_id, result_sha256, reviewed_at, reviewer, agree, diagnosis, action, "
                     "histopathology, note) VALUES (?, ?, '2026-11-28T00:00:00Z', 'dr test', 1, 'nv', 'none', ?, '')",
                     (rid, sha, histo))  # histopathology naming a label wins over the clinical diagnosis
    conn.commit()
    conn.close()
    r = CliRunner().invoke(main, ["calibrate", "--from-reviews", "--db", str(dirs["db"]), "--model",
                                  str(fresh_bundle), "--bootstrap", "200", "--dry-run", "--format", "json"])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert doc["data"]["by_label"] == {"mel": 22, "nv": 22} and doc["written"] is False
    assert not default_path(fresh_bundle).exists()


def test_migration_from_version_2(tmp_path):
    import sqlite_utils

    from edge_agent import store

    db = tmp_path / "v2.db"
    conn = sqlite3.connect(db)
    d = sqlite_utils.Database(conn)
    for version, _, fn in store.MIGRATIONS[:2]:
        fn(d)
        conn.execute("INSERT INTO schema_version (version, applied_at, description) VALUES (?, '', '')", (version,))
    conn.execute("PRAGMA user_version = 2")
    conn.commit()
    conn.close()
    w = store.Writer(db, ["mel", "nv"])
    cols = {r[1] for r in w.conn.execute("PRAGMA table_info(results)")}
    assert "calibration_id" in cols
    assert w.conn.execute("SELECT count(*) FROM daily_figures").fetchone()[0] == 0
    store._migration_site_calibration(sqlite_utils.Database(w.conn))  # idempotent
    w.close()


def test_model_info_shows_a_refused_calibration(fresh_bundle):
    b = load_bundle(fresh_bundle)
    doc = _doc(b)
    doc["thresholds"]["melanoma"]["probability"] = 0.9  # edited by hand after sealing
    default_path(fresh_bundle).write_text(json.dumps(doc))
    r = CliRunner().invoke(main, ["model", "info", str(fresh_bundle)])
    assert r.exit_code == 1 and "calibration:   REFUSED:" in r.output and "fails its checksum" in r.output
    default_path(fresh_bundle).unlink()
    r = CliRunner().invoke(main, ["model", "info", str(fresh_bundle)])
    assert r.exit_code == 0 and "calibration:   none" in r.output


def test_model_swap_verifies_the_new_bundles_calibration(fresh_bundle, dirs, tmp_path):
    """A bundle activated later gets its own calibration checked before the switch: the one beside it is applied,
    a file made for another model id rejects the switch."""
    from edge_agent.modelswap import SwapRejected, prepare

    b = load_bundle(fresh_bundle)
    s = settings_for(dirs, fresh_bundle)
    default_path(fresh_bundle).write_text(json.dumps(_doc(b)))
    cand = prepare(fresh_bundle, s)
    assert cand.policy.calibration_id == _doc(b)["calibration_id"] and cand.policy.thresholds()["melanoma"] == 0.0
    other = tmp_path / "other.json"
    other.write_text(json.dumps(_doc(b, model_id="some-other-model-1234")))
    with pytest.raises(SwapRejected, match="was made for model 'some-other-model-1234'"):
        prepare(fresh_bundle, settings_for(dirs, fresh_bundle, calibration=other))
