"""One-shot scans with the real pipeline: real model, real SQLite file, real file moves."""
from __future__ import annotations

import csv
import io
import json
import os
import shutil
import time
import stat
from pathlib import Path

import cv2
import pytest
from click.testing import CliRunner

from conftest import rows, scan_now, variant_jpegs
from edge_agent.cli import main

LABELS = ("akiec", "bcc", "bkl", "df", "mel", "nv", "vasc")


def inbox_files(inbox: Path) -> list[Path]:
    return sorted(p for p in inbox.rglob("*") if p.is_symlink() or not p.is_dir())


def test_scan_of_the_example_images(dirs: dict[str, Path], bundle_dir: Path, example_images: list[Path]) -> None:
    for p in example_images:
        shutil.copy(p, dirs["inbox"])
    code, agent = scan_now(dirs, bundle_dir)
    assert code == 0 and agent.counts.results == 12
    res = rows(dirs["db"], "SELECT * FROM results")
    assert len(res) == 12
    assert {r["original_name"] for r in res} == {p.name for p in example_images}
    for r in res:
        p = [r[f"p_{lab}"] for lab in LABELS]
        assert sum(p) == pytest.approx(1.0, abs=1e-4)
        assert sum(json.loads(r["probabilities"]).values()) == pytest.approx(1.0, abs=1e-4)
        assert r["label"] in LABELS and r["confidence"] == pytest.approx(max(p), abs=1e-6)
        assert r["model_variant"] == "int8" and r["fallback"] == 0 and r["model_id"].startswith("test-tiny")
        assert r["file_state"] == "moved" and Path(r["stored_path"]).is_file()
        assert r["needs_review"] == (r["review_reasons"] != "")
        assert r["image_format"] == "jpeg" and (r["width"], r["height"]) == (200, 150)
        assert r["sharpness"] > 0 and r["latency_ms"] >= 0 and len(r["sha256"]) == 64
    assert inbox_files(dirs["inbox"]) == []
    assert stat.S_IMODE(os.stat(dirs["db"]).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(dirs["quarantine"]).st_mode) == 0o700
    assert rows(dirs["db"], "PRAGMA journal_mode")[0][0] == "wal"


def test_same_image_twice_is_screened_once(dirs: dict[str, Path], bundle_dir: Path,
                                           example_images: list[Path]) -> None:
    src = example_images[3]
    shutil.copy(src, dirs["inbox"] / "first.jpg")
    shutil.copy(src, dirs["inbox"] / "again.jpg")
    (dirs["inbox"] / "sub").mkdir()
    shutil.copy(src, dirs["inbox"] / "sub" / "third.jpg")
    code, agent = scan_now(dirs, bundle_dir)
    assert code == 0
    res = rows(dirs["db"], "SELECT id, sha256 FROM results")
    dups = rows(dirs["db"], "SELECT * FROM duplicates")
    assert len(res) == 1 and len(dups) == 2
    assert all(d["result_id"] == res[0]["id"] and d["sha256"] == res[0]["sha256"] for d in dups)
    assert all("duplicates" in Path(d["stored_path"]).parts and Path(d["stored_path"]).exists() for d in dups)
    # the same image arriving later is a duplicate of the stored result, not a new one
    shutil.copy(src, dirs["inbox"] / "much-later.jpg")
    assert scan_now(dirs, bundle_dir)[0] == 0
    assert len(rows(dirs["db"], "SELECT id FROM results")) == 1
    assert len(rows(dirs["db"], "SELECT id FROM duplicates")) == 3
    assert inbox_files(dirs["inbox"]) == []


def test_bad_files_are_quarantined_with_reasons(dirs: dict[str, Path], bundle_dir: Path, example_images: list[Path],
                                                tmp_path: Path) -> None:
    inbox = dirs["inbox"]
    good = example_images[0].read_bytes()
    (inbox / "empty.jpg").write_bytes(b"")
    (inbox / "truncated.jpg").write_bytes(good[: len(good) // 2])
    (inbox / "notes.jpg").write_text("this is not a photo\n" * 20)
    (inbox / "huge.png").write_bytes(
        b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x01\x86\xa0\x00\x01\x86\xa0\x08\x02\x00\x00\x00\x00\x00\x00\x00"
        + b"\x00\x00\x00\x00IEND\xaeB`\x82")
    outside = tmp_path / "outside.jpg"
    outside.write_bytes(good)
    os.symlink(outside, inbox / "link.jpg")
    os.mkfifo(inbox / "pipe.jpg")
    shutil.copy(example_images[1], inbox / "fine.jpg")
    n_in = len(inbox_files(inbox))
    # Empty and truncated files are quarantined once unchanged for partial_timeout_seconds, by scan as by run
    # (a younger one may still be being copied: tests/test_harden_waiting_files.py); these are older than that.
    time.sleep(0.3)
    code, agent = scan_now(dirs, bundle_dir, partial_timeout_seconds=0.2)
    assert code == 0
    q = {r["original_name"]: r for r in rows(dirs["db"], "SELECT * FROM quarantine")}
    assert {k: v["reason_code"] for k, v in q.items()} == {
        "empty.jpg": "empty", "truncated.jpg": "truncated", "notes.jpg": "not_image", "huge.png": "too_many_pixels",
        "link.jpg": "symlink", "pipe.jpg": "not_regular"}
    assert all(len(r["reason"]) > 30 for r in q.values())  # a sentence a person can act on
    assert all(Path(r["stored_path"]).parent.is_relative_to(dirs["quarantine"]) for r in q.values())
    assert all(os.path.lexists(r["stored_path"]) for r in q.values())
    assert q["notes.jpg"]["sha256"] and q["link.jpg"]["sha256"] is None
    assert outside.read_bytes() == good  # the link was moved, never followed
    assert len(rows(dirs["db"], "SELECT id FROM results")) == 1
    # every file got exactly one outcome
    total = sum(len(rows(dirs["db"], f"SELECT id FROM {t}")) for t in ("results", "duplicates", "quarantine"))
    assert total == n_in and inbox_files(inbox) == []


def test_after_keep_leaves_files_and_never_records_twice(dirs: dict[str, Path], bundle_dir: Path,
                                                         example_images: list[Path]) -> None:
    for p in example_images[:3]:
        shutil.copy(p, dirs["inbox"])
    (dirs["inbox"] / "bad.jpg").write_text("nope")
    assert scan_now(dirs, bundle_dir, after="keep")[0] == 0
    assert scan_now(dirs, bundle_dir, after="keep")[0] == 0
    assert len(inbox_files(dirs["inbox"])) == 4
    assert len(rows(dirs["db"], "SELECT id FROM results WHERE file_state = 'kept'")) == 3
    assert len(rows(dirs["db"], "SELECT id FROM quarantine")) == 1
    assert rows(dirs["db"], "SELECT count(*) FROM duplicates")[0][0] == 0
    # switching to move later moves the kept files without new rows
    assert scan_now(dirs, bundle_dir, after="move")[0] == 0
    assert inbox_files(dirs["inbox"]) == []
    assert len(rows(dirs["db"], "SELECT id FROM results WHERE file_state = 'moved'")) == 3
    assert rows(dirs["db"], "SELECT count(*) FROM duplicates")[0][0] == 0


def test_after_delete_removes_results_but_keeps_quarantine(dirs: dict[str, Path], bundle_dir: Path,
                                                           example_images: list[Path]) -> None:
    shutil.copy(example_images[0], dirs["inbox"])
    (dirs["inbox"] / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    assert scan_now(dirs, bundle_dir, after="delete")[0] == 0
    assert inbox_files(dirs["inbox"]) == []
    r = rows(dirs["db"], "SELECT file_state, stored_path FROM results")[0]
    assert r["file_state"] == "deleted" and r["stored_path"] is None
    q = rows(dirs["db"], "SELECT file_state, stored_path FROM quarantine")[0]
    assert q["file_state"] == "moved" and Path(q["stored_path"]).exists()


def test_temp_and_hidden_files_are_left_alone(dirs: dict[str, Path], bundle_dir: Path,
                                              example_images: list[Path]) -> None:
    for name in ("upload.jpg.part", "x.tmp", "backup.jpg~", ".DS_Store"):
        shutil.copy(example_images[0], dirs["inbox"] / name)
    (dirs["inbox"] / ".hidden").mkdir()
    shutil.copy(example_images[0], dirs["inbox"] / ".hidden" / "a.jpg")
    code, agent = scan_now(dirs, bundle_dir)
    assert code == 0 and agent.counts.total() == 0
    assert len(inbox_files(dirs["inbox"])) == 5


def test_abandoned_partial_upload_is_quarantined(dirs: dict[str, Path], bundle_dir: Path,
                                                 example_images: list[Path]) -> None:
    p = dirs["inbox"] / "upload.jpg.part"
    shutil.copy(example_images[0], p)
    old = p.stat().st_mtime - 3600
    os.utime(p, (old, old))
    # ctime cannot be set back; a partial timeout shorter than the test's own age stands in for "an hour later"
    time.sleep(0.1)  # ...and the file must really be older than that timeout when the scan first looks
    code, agent = scan_now(dirs, bundle_dir, partial_timeout_seconds=0.01)
    assert code == 0
    q = rows(dirs["db"], "SELECT reason_code, reason FROM quarantine")
    assert [r["reason_code"] for r in q] == ["abandoned_partial"] and "send the image again" in q[0]["reason"]


def test_large_and_other_format_images(dirs: dict[str, Path], bundle_dir: Path, example_images: list[Path]) -> None:
    img = cv2.imread(str(example_images[5]))
    cv2.imwrite(str(dirs["inbox"] / "big.jpg"), cv2.resize(img, (2400, 1800)))
    for ext in (".png", ".bmp", ".tiff", ".webp"):
        cv2.imwrite(str(dirs["inbox"] / f"img{ext}"), cv2.flip(img, 0) if ext == ".png" else img)
    assert scan_now(dirs, bundle_dir)[0] == 0
    res = {r["original_name"]: r for r in rows(dirs["db"], "SELECT * FROM results")}
    dups = rows(dirs["db"], "SELECT * FROM duplicates")
    assert res.get("big.jpg") and res["big.jpg"]["decode_reduction"] > 1
    assert len(res) + len(dups) == 5  # bmp/tiff hold the same pixels but different bytes: all screened
    assert {r["image_format"] for r in res.values()} >= {"jpeg", "png", "bmp", "tiff", "webp"}


def test_cli_scan_results_and_status(dirs: dict[str, Path], bundle_dir: Path, example_images: list[Path]) -> None:
    variant_jpegs(example_images, dirs["inbox"], 14)
    # not an image at all (a truncated one would wait partial_timeout_seconds, as in `run`)
    (dirs["inbox"] / "broken.jpg").write_bytes(b"this is not a JPEG\n" * 4)
    runner = CliRunner()
    base = ["--db", str(dirs["db"])]
    res = runner.invoke(main, ["scan", "--inbox", str(dirs["inbox"]), *base, "--model", str(bundle_dir),
                               "--workers", "2", "--threads", "1", "--log-level", "WARNING"])
    assert res.exit_code == 0, res.output
    assert "processed:" in res.output and "14" in res.output and "quarantined:" in res.output
    assert "images/s" in res.output and "broken.jpg" in res.output

    table = runner.invoke(main, ["results", *base])
    assert table.exit_code == 0 and sum("img_0" in line for line in table.output.splitlines()) == 14
    as_csv = list(csv.DictReader(io.StringIO(runner.invoke(main, ["results", *base, "--format", "csv"]).output)))
    assert len(as_csv) == 14 and "p_mel" in as_csv[0] and "review_reasons" in as_csv[0]
    as_json = json.loads(runner.invoke(main, ["results", *base, "--format", "json"]).output)
    assert len(as_json) == 14 and isinstance(as_json[0]["probabilities"], dict)
    flagged = json.loads(runner.invoke(main, ["results", *base, "--flagged", "--format", "json"]).output)
    assert all(r["needs_review"] == 1 for r in flagged) and len(flagged) == sum(r["needs_review"] for r in as_json)
    label = as_json[0]["label"]
    by_label = json.loads(runner.invoke(main, ["results", *base, "--label", label, "--format", "json"]).output)
    assert by_label and all(r["label"] == label for r in by_label)
    assert json.loads(runner.invoke(main, ["results", *base, "--since", "1h", "--format", "json"]).output)
    assert json.loads(runner.invoke(main, ["results", *base, "--since", "2999-01-01", "--format", "json"]).output) == []
    assert runner.invoke(main, ["results", *base, "--since", "last tuesday"]).exit_code == 2

    st = runner.invoke(main, ["status", *base, "--json"])
    assert st.exit_code == 0, st.output
    s = json.loads(st.output)
    assert s["results"] == 14 and s["quarantined"] == 1 and s["backlog"] == 0 and s["warnings"] == []
    assert s["agent"]["model_variant"] == "int8" and s["agent"]["model_id"].startswith("test-tiny")
    human = runner.invoke(main, ["status", *base])
    assert "model in use:" in human.output and "inbox backlog:   0" in human.output
    missing = runner.invoke(main, ["results", "--db", str(dirs["root"] / "nope.db")])
    assert missing.exit_code == 2 and "no database" in missing.output


def test_scan_refuses_to_start_on_a_full_disk(dirs: dict[str, Path], bundle_dir: Path,
                                              example_images: list[Path]) -> None:
    shutil.copy(example_images[0], dirs["inbox"])
    code, agent = scan_now(dirs, bundle_dir, min_free_mb=1e12)
    assert code == 3 and "not enough disk space" in agent.fatal
    assert len(inbox_files(dirs["inbox"])) == 1 and rows(dirs["db"], "SELECT count(*) FROM results")[0][0] == 0


def test_scan_of_more_files_than_intake_holds(dirs: dict[str, Path], bundle_dir: Path, example_images: list[Path],
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """Intake keeps at most INTAKE_LIMIT paths in memory; a scan still gets through a larger inbox."""
    import edge_agent.pipeline as pipeline

    monkeypatch.setattr(pipeline, "INTAKE_LIMIT", 6)
    variant_jpegs(example_images, dirs["inbox"], 20)
    code, agent = scan_now(dirs, bundle_dir, queue_max=1)
    assert code == 0 and agent.intake.limit == 6 and agent.counts.results == 20
    assert inbox_files(dirs["inbox"]) == []


def test_processed_dir_on_another_file_system(dirs: dict[str, Path], bundle_dir: Path,
                                              example_images: list[Path]) -> None:
    """Across file systems a rename is impossible: copy, fsync, rename into place, then unlink."""
    import tempfile

    shm = Path("/dev/shm")
    if not shm.is_dir() or shm.stat().st_dev == dirs["inbox"].stat().st_dev:
        pytest.skip("needs /dev/shm on a different file system than the test's temp folder")
    with tempfile.TemporaryDirectory(dir=shm) as other:
        shutil.copy(example_images[0], dirs["inbox"])
        assert scan_now(dirs, bundle_dir, processed_dir=Path(other) / "processed")[0] == 0
        stored = Path(rows(dirs["db"], "SELECT stored_path FROM results")[0][0])
        assert stored.is_relative_to(other) and stored.read_bytes() == example_images[0].read_bytes()
        assert inbox_files(dirs["inbox"]) == [] and not list(stored.parent.glob(".*edge-agent-tmp"))
