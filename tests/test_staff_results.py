"""Issue 17, clinic staff: `edge-agent results` reads like a worklist; quarantine and duplicates in the CLI.

Before: results were listed oldest first (so `--limit 20` gave the 20 oldest), in
UTC, without where the image went; `--label MEL` / `--label melanoma` /
`--label xyz` silently matched nothing; quarantined and duplicate files could
only be listed with SQL; a blank photo read "nv 0.49" next to its
`poor_quality` flag. Each test runs the real CLI in a subprocess on a database
written by a real scan.
"""
from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import cv2
import numpy as np
import pytest

from faults import agent_env, distinct_images, site_args, write_images


def cli(*args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edge_agent", *args], env=agent_env(**env), capture_output=True,
                          text=True, timeout=120, cwd="/")


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory, bundle_dir: Path) -> dict[str, Path]:
    """Two real scans: first 4 images (and a blank white one, a truncated file), then 3 more and a copy of
    an earlier image. The second scan's results are the newest."""
    root = tmp_path_factory.mktemp("staff")
    dirs = {"root": root, "inbox": root / "inbox", "db": root / "db" / "results.db", "processed": root / "processed",
            "quarantine": root / "quarantine"}
    imgs = distinct_images(7, seed=1701)
    write_images(dirs["inbox"], imgs[:4], prefix="first")
    ok, white = cv2.imencode(".jpg", np.full((64, 64, 3), 255, np.uint8))
    (dirs["inbox"] / "blank_white.jpg").write_bytes(white.tobytes())
    (dirs["inbox"] / "cut.jpg").write_bytes(imgs[0][:40])
    time.sleep(1.2)  # an abandoned partial copy: unchanged for longer than partial_timeout_seconds (0.5 s here)
    r = cli("scan", *site_args(dirs, bundle_dir, "--log-level", "ERROR", "--partial-timeout-seconds", "0.5"))
    assert r.returncode == 0, r.stderr
    write_images(dirs["inbox"], imgs[4:], prefix="second")
    (dirs["inbox"] / "again.jpg").write_bytes(imgs[1])
    r = cli("scan", *site_args(dirs, bundle_dir, "--log-level", "ERROR"))
    assert r.returncode == 0, r.stderr
    return dirs


def db_rows(db: Path, sql: str) -> list[dict]:
    conn = sqlite3.connect(db)
    conn.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in conn.execute(sql)]
    finally:
        conn.close()


def results_json(site: dict[str, Path], *args: str) -> list[dict]:
    r = cli("results", "--db", str(site["db"]), "--format", "json", *args)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def test_newest_first_by_default_so_limit_gives_the_newest(site) -> None:
    newest = db_rows(site["db"], "SELECT original_name FROM results ORDER BY processed_at DESC, id DESC LIMIT 3")
    got = results_json(site, "--limit", "3")
    assert [r["original_name"] for r in got] == [r["original_name"] for r in newest]
    assert {r["original_name"] for r in got} == {"second_0000.jpg", "second_0001.jpg", "second_0002.jpg"}
    oldest = results_json(site, "--limit", "2", "--sort", "oldest")
    assert all(r["original_name"].startswith(("first", "blank")) for r in oldest)
    table = cli("results", "--db", str(site["db"]), "--limit", "3").stdout
    assert "second_" in table and "first_" not in table


def test_sort_by_risk_puts_the_highest_calibrated_p_malignant_first(site) -> None:
    got = results_json(site, "--sort", "risk")
    p = [r["p_high_risk"] for r in got]
    assert p == sorted(p, reverse=True) and len(set(p)) > 1
    top = cli("results", "--db", str(site["db"]), "--sort", "risk", "--limit", "1").stdout
    assert f"{p[0]:.2f}" in top and "P(malignant)" in top


def test_table_shows_where_the_image_went(site) -> None:
    out = cli("results", "--db", str(site["db"])).stdout
    assert "stored at" in out
    for r in db_rows(site["db"], "SELECT stored_path FROM results"):
        assert r["stored_path"].startswith(str(site["processed"])) and Path(r["stored_path"]).exists()
        assert r["stored_path"] in out


def test_times_are_local_by_default_and_utc_on_request(site) -> None:
    row = db_rows(site["db"], "SELECT processed_at FROM results ORDER BY id DESC LIMIT 1")[0]
    utc = datetime.fromisoformat(row["processed_at"].replace("Z", "+00:00"))
    tz = "Asia/Kathmandu"  # UTC+05:45 all year: no clock of this machine shows the same time
    if not Path("/usr/share/zoneinfo", tz).exists():
        pytest.skip("no time zone database here")
    os.environ["TZ"] = tz
    try:
        import time as _time

        _time.tzset()
        local = utc.astimezone().strftime("%Y-%m-%d %H:%M:%S")
    finally:
        del os.environ["TZ"]
        _time.tzset()
    shown = cli("results", "--db", str(site["db"]), "--limit", "1", TZ=tz).stdout
    assert local in shown and "processed (+0545)" in shown.splitlines()[0], shown
    assert utc.strftime("%Y-%m-%d %H:%M:%S") not in shown
    shown_utc = cli("results", "--db", str(site["db"]), "--limit", "1", "--utc", TZ=tz).stdout
    assert utc.strftime("%Y-%m-%d %H:%M:%S") in shown_utc and "(UTC)" in shown_utc
    # the database and JSON stay UTC
    assert results_json(site, "--limit", "1")[0]["processed_at"] == row["processed_at"]


@pytest.mark.parametrize("spelling", ["mel", "MEL", "melanoma", "Melanoma", " MELANOMA "])
def test_label_by_code_or_name_any_case(site, spelling) -> None:
    want = {r["id"] for r in db_rows(site["db"], "SELECT id FROM results WHERE label = 'mel'")}
    got = results_json(site, "--label", spelling)
    assert {r["id"] for r in got} == want


def test_label_names_come_from_the_bundle_for_labels_no_result_has(site, bundle_dir) -> None:
    present = {r["label"] for r in db_rows(site["db"], "SELECT DISTINCT label FROM results")}
    manifest = json.loads((bundle_dir / "manifest.json").read_text())
    absent = [lab for lab in manifest["labels"] if lab not in present]
    if not absent:
        pytest.skip("every label has a result in this database")
    name = manifest["label_names"][absent[0]]
    assert results_json(site, "--label", absent[0]) == []
    # `results` reads the human names of the bundle named in the settings (model = ...)
    cfg = site["root"] / "names.toml"
    cfg.write_text(f'db = "{site["db"]}"\nmodel = "{bundle_dir}"\n')
    r = cli("results", "--config", str(cfg), "--label", name.upper(), "--format", "json")
    assert r.returncode == 0 and json.loads(r.stdout) == [], r.stderr


def test_unknown_label_is_refused_listing_the_valid_ones(site) -> None:
    r = cli("results", "--db", str(site["db"]), "--label", "xyz")
    assert r.returncode == 2, r.stdout
    assert "unknown label 'xyz'" in r.stderr and "mel (melanoma)" in r.stderr.lower() and "nv (" in r.stderr
    assert "Traceback" not in r.stderr and r.stdout == ""


def test_a_photo_that_fails_the_quality_check_reads_retake(site) -> None:
    blank = db_rows(site["db"], "SELECT * FROM results WHERE original_name = 'blank_white.jpg'")[0]
    assert "poor_quality" in blank["review_reasons"] and blank["quality_issues"]
    line = next(x for x in cli("results", "--db", str(site["db"])).stdout.splitlines() if "blank_white.jpg" in x)
    words = blank["quality_issues"].replace("_", " ").replace(",", ", ")
    assert f"retake: {words}  " in line and "overexposed" in words
    assert f" {blank['label']} " not in line and f"{blank['confidence']:.2f}" not in line  # no diagnosis-like label
    # the probabilities stay in the database and in JSON
    j = next(r for r in results_json(site) if r["original_name"] == "blank_white.jpg")
    assert j["shown"].startswith("retake: ") and j["label"] == blank["label"]
    assert sum(j["probabilities"].values()) == pytest.approx(1.0, abs=1e-3)


def test_ndjson_is_one_object_per_line(site) -> None:
    r = cli("results", "--db", str(site["db"]), "--format", "ndjson")
    lines = r.stdout.splitlines()
    assert r.returncode == 0 and len(lines) == len(db_rows(site["db"], "SELECT id FROM results"))
    objs = [json.loads(x) for x in lines]
    assert all(isinstance(o["probabilities"], dict) and o["where"] for o in objs)


def test_quarantine_lists_what_was_refused_with_the_reason_in_words(site) -> None:
    q = db_rows(site["db"], "SELECT * FROM quarantine")
    assert [x["original_name"] for x in q] == ["cut.jpg"]
    out = cli("quarantine", "--db", str(site["db"]))
    assert out.returncode == 0, out.stderr
    line = next(x for x in out.stdout.splitlines() if "cut.jpg" in x)
    assert q[0]["reason"] in line and q[0]["stored_path"] in line and "truncated" in line
    nd = cli("quarantine", "--db", str(site["db"]), "--format", "ndjson").stdout.splitlines()
    assert [json.loads(x)["reason"] for x in nd] == [q[0]["reason"]]


def test_duplicates_name_the_result_they_repeat(site) -> None:
    d = db_rows(site["db"], "SELECT * FROM duplicates")
    first = db_rows(site["db"], "SELECT * FROM results WHERE original_name = 'first_0001.jpg'")[0]
    assert len(d) == 1 and d[0]["result_id"] == first["id"]
    out = cli("duplicates", "--db", str(site["db"])).stdout
    line = next(x for x in out.splitlines() if "again.jpg" in x)
    assert f"result #{first['id']} first_0001.jpg" in line and d[0]["stored_path"] in line
    obj = json.loads(cli("duplicates", "--db", str(site["db"]), "--format", "ndjson").stdout)
    assert obj["reason"].startswith(f"same content as result #{first['id']} first_0001.jpg")


def test_empty_lists_say_so(tmp_path, bundle_dir) -> None:
    dirs = {"inbox": tmp_path / "inbox", "db": tmp_path / "r.db"}
    dirs["inbox"].mkdir()
    assert cli("scan", *site_args(dirs, bundle_dir, "--log-level", "ERROR")).returncode == 0
    for cmd in ("results", "quarantine", "duplicates"):
        r = cli(cmd, "--db", str(dirs["db"]))
        assert r.returncode == 0 and f"no {cmd} match" in r.stdout, r.stderr
        r = cli(cmd, "--db", str(dirs["db"]), "--format", "ndjson")
        assert r.returncode == 0 and r.stdout == "", r.stdout
