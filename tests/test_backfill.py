"""`edge-agent backfill` on a local Ray cluster (2 CPUs, no dashboard, a small object store) and
`edge-agent backfill-merge`: the same rows as `scan`, exactly once after a SIGKILL and a resume, and a
read-only archive left untouched. The Ray runs share one module fixture (two Ray starts in all) so the file
stays under a minute; the rest runs without Ray.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

if os.environ.get("CI"):  # CI installs the test extra (ray[data], pyarrow): a missing Ray must fail there
    import pyarrow.parquet as pq
    import ray.data  # noqa: F401
else:
    pytest.importorskip("ray.data")
    pq = pytest.importorskip("pyarrow.parquet")

from bundle_factory import TEST_PUBLIC_KEY, make_bundle  # noqa: E402
from conftest import EXAMPLES, rows, scan_now  # noqa: E402
from faults import agent_env  # noqa: E402

RAY_ARGS = ["--num-cpus", "2", "--object-store-mb", "100", "--no-dashboard", "--threads", "1"]
SPOT = "1.0"  # every image gets the FP32 spot-check: its flags must agree too
N_IMAGES = 20


def _snapshot(root: Path) -> dict[str, tuple[str, int, int]]:
    """Every entry below root: (sha256 or 'dir', mtime_ns, mode)."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            s = p.lstat()
            digest = "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
            out[str(p.relative_to(root))] = (digest, s.st_mtime_ns, s.st_mode)
    out["."] = ("dir", root.stat().st_mtime_ns, root.stat().st_mode)
    return out


def _make_archive(root: Path) -> None:
    """Big distinct JPEGs (decoding takes long enough to stop a run half-way), an identical copy, a text file
    named .jpg, an image too small to screen, a hidden file; folders and files read-only."""
    sources = sorted(EXAMPLES.glob("*.jpg"))
    rng = np.random.default_rng(7)
    for i in range(N_IMAGES):
        img = cv2.imread(str(sources[i % len(sources)]))
        img = cv2.resize(img, (2400, 1800), interpolation=cv2.INTER_LINEAR)
        img = cv2.add(img, np.full_like(img, i // len(sources) + 1))
        # fine grain, as a dermatoscope's sensor gives: more entropy-coded data, so each decode takes a while
        img = cv2.add(img, rng.integers(0, 12, img.shape, dtype=np.uint8))
        sub = root / ("2019" if i % 2 else "2020") / f"m{i % 3}"
        sub.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(sub / f"lesion_{i:03d}.jpg"), img, [cv2.IMWRITE_JPEG_QUALITY, 90])
    shutil.copy2(root / "2020" / "m0" / "lesion_000.jpg", root / "2019" / "copy_of_000.jpg")
    (root / "notes.jpg").write_text("not an image, just notes\n")
    cv2.imwrite(str(root / "2019" / "tiny.png"), np.full((8, 8, 3), 120, np.uint8))
    (root / ".DS_Store").write_bytes(b"\0" * 64)
    for dirpath, dirnames, filenames in os.walk(root, topdown=False):
        for name in filenames:
            os.chmod(Path(dirpath) / name, 0o444)
        os.chmod(dirpath, 0o555)


def _backfill_cmd(archive: Path, out: Path, bundle: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "edge_agent", "backfill", str(archive), "-o", str(out), "--model", str(bundle),
            "--spot-check-fraction", SPOT, *RAY_ARGS, *extra]


def _complete_parts(out: Path) -> int:
    n = 0
    for p in out.glob("outcome=*/*.parquet"):
        try:
            n += pq.read_metadata(p).num_rows
        except Exception:  # being written
            pass
    return n


def _parquet_rows(out: Path) -> list[dict[str, Any]]:
    got = []
    for p in sorted(out.glob("outcome=*/*.parquet")):
        outcome = p.parent.name.split("=", 1)[1]
        got.extend({**r, "outcome": outcome} for r in pq.read_table(p).to_pylist())
    return got


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One archive; a backfill SIGKILLed after its first rows are written, then the same command again."""
    base = tmp_path_factory.mktemp("backfill")
    bundle = make_bundle(base / "bundle", int8_seed=1)  # INT8 differs from FP32: spot-check flags to compare
    archive = base / "archive"
    _make_archive(archive)
    before = _snapshot(archive)
    out = base / "out"
    env = agent_env()
    log1 = (base / "first.log").open("wb")
    first = subprocess.Popen(_backfill_cmd(archive, out, bundle, "--rows-per-file", "1", "--batch-rows", "1"),
                             env=env, stdout=log1, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 120  # bounds a hang only
        while _complete_parts(out) == 0 and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        first.send_signal(signal.SIGKILL)  # the backfill's own process, as an OOM kill or a power cut would
        killed_at = _complete_parts(out)
        first.wait(timeout=30)
    finally:
        # Ray's per-node helper processes outlive a SIGKILLed driver, and its workers do for a few seconds (in
        # process groups of their own): the resume's claim keeps their late writes out (test_backfill_publish).
        # Ours to clean up: the process group this test started.
        try:
            os.killpg(first.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        log1.close()
    second = subprocess.run(_backfill_cmd(archive, out, bundle), env=env, capture_output=True, text=True,
                            timeout=300)
    return {"base": base, "bundle": bundle, "archive": archive, "out": out, "before": before,
            "killed_at": killed_at, "first_rc": first.returncode, "second": second,
            "first_log": (base / "first.log").read_text(errors="replace")}


def _inputs(archive: Path) -> list[str]:
    return sorted(str(p) for p in archive.rglob("*") if p.is_file() and not p.name.startswith("."))


def test_a_killed_backfill_resumed_with_the_same_command_writes_every_input_exactly_once(run: dict[str, Any]) -> None:
    second = run["second"]
    assert run["first_rc"] == -signal.SIGKILL, run["first_log"][-3000:]
    assert second.returncode == 0, second.stdout + second.stderr[-5000:]
    inputs = _inputs(run["archive"])
    assert len(inputs) == N_IMAGES + 3
    # the first run was stopped half-way: the second skipped what was written and did the rest
    assert 0 < run["killed_at"] < len(inputs), run["first_log"][-3000:]
    m = [ln for ln in second.stderr.splitlines() if "already written" in ln]
    assert m and m[0].startswith("backfill: ") and int(m[0].split()[1]) >= run["killed_at"], second.stderr[-3000:]
    got = _parquet_rows(run["out"])
    paths = [r["original_path"] for r in got]
    assert sorted(paths) == inputs  # each input exactly once, nothing else (the hidden file is not an input)
    assert len({r["input_key"] for r in got}) == len(got)
    assert f"{len(inputs)} of {len(inputs)} inputs written" in second.stdout


def test_backfill_rows_equal_scan_rows_for_the_same_images(run: dict[str, Any], tmp_path: Path) -> None:
    archive: Path = run["archive"]
    dirs = {"root": tmp_path, "inbox": tmp_path / "inbox", "db": tmp_path / "db" / "scan.db",
            "processed": tmp_path / "processed", "quarantine": tmp_path / "quarantine"}
    shutil.copytree(archive, dirs["inbox"])
    for dirpath, _, _ in os.walk(dirs["inbox"]):
        os.chmod(dirpath, 0o755)
    code, agent = scan_now(dirs, run["bundle"], after="keep", spot_check_fraction=float(SPOT),
                           partial_timeout_seconds=1.0)
    assert code == 0
    scan_results = {Path(r["original_path"]).relative_to(dirs["inbox"]).as_posix(): dict(r)
                    for r in rows(dirs["db"], "SELECT * FROM results")}
    scan_dups = {Path(r["original_path"]).relative_to(dirs["inbox"]).as_posix(): dict(r)
                 for r in rows(dirs["db"], "SELECT * FROM duplicates")}
    scan_quar = {Path(r["original_path"]).relative_to(dirs["inbox"]).as_posix(): dict(r)
                 for r in rows(dirs["db"], "SELECT * FROM quarantine")}
    got = {Path(r["original_path"]).relative_to(archive).as_posix(): r for r in _parquet_rows(run["out"])}
    assert set(got) == set(scan_results) | set(scan_dups) | set(scan_quar)
    assert len(scan_dups) == 1 and len(scan_quar) == 2
    by_sha = {r["sha256"]: r for r in scan_results.values()}
    flagged = 0
    for rel, b in got.items():
        if rel in scan_quar:
            q = scan_quar[rel]
            assert b["outcome"] == "quarantine"
            assert (b["reason_code"], b["reason"], b["sha256"], b["size_bytes"]) == \
                (q["reason_code"], q["reason"], q["sha256"], q["size_bytes"])
            continue
        assert b["outcome"] == "result", rel
        s = by_sha[b["sha256"]]  # the duplicate in the scan names the same image's result
        for col in ("label", "label_name", "needs_review", "review_reasons", "high_risk_rules", "quality_issues",
                    "image_format", "width", "height", "decode_reduction", "spot_checked", "spot_label",
                    "model_id", "model_variant", "manifest_sha256", "policy", "fallback", "sharpness",
                    "brightness", "clipped_dark", "clipped_bright"):
            assert b[col] == s[col], (rel, col, b[col], s[col])
        pb, ps = json.loads(b["probabilities"]), json.loads(s["probabilities"])
        assert pb.keys() == ps.keys()
        for lab in pb:
            assert abs(pb[lab] - ps[lab]) <= 1e-6 and abs(b[f"p_{lab}"] - s[f"p_{lab}"]) <= 1e-6
        for col in ("confidence", "p_high_risk"):
            assert abs(b[col] - s[col]) <= 1e-6
        assert (b["ood_score"] is None) == (s["ood_score"] is None)  # bundle format 3: the same OOD score
        assert b["ood_score"] is None or abs(b["ood_score"] - s["ood_score"]) <= 1e-4
        assert b["file_state"] == "kept" and b["stored_path"] is None
        flagged += bool(b["needs_review"])
    assert all(r["spot_checked"] == 1 for r in scan_results.values())
    assert flagged > 0  # the comparison covered review flags, not only unflagged rows


def test_a_read_only_archive_is_left_exactly_as_it_was(run: dict[str, Any]) -> None:
    assert _snapshot(run["archive"]) == run["before"]


def test_merge_keys_by_sha256_and_merging_again_adds_nothing(run: dict[str, Any], tmp_path: Path) -> None:
    db = tmp_path / "db" / "results.db"
    env = agent_env()
    cmd = [sys.executable, "-m", "edge_agent", "backfill-merge", str(run["out"]), "--db", str(db)]
    first = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert first.returncode == 0, first.stderr
    assert f"{N_IMAGES} results, 1 duplicates, 2 quarantined, 0 already there" in first.stdout
    counts = [len(rows(db, f"SELECT id FROM {t}")) for t in ("results", "duplicates", "quarantine")]
    assert counts == [N_IMAGES, 1, 2]
    again = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0, again.stderr
    assert f"0 results, 0 duplicates, 0 quarantined, {N_IMAGES + 3} already there" in again.stdout
    assert [len(rows(db, f"SELECT id FROM {t}")) for t in ("results", "duplicates", "quarantine")] == counts
    dup = rows(db, "SELECT d.original_path, r.sha256 AS rsha, d.sha256 FROM duplicates d "
                   "JOIN results r ON r.id = d.result_id")[0]
    assert dup["rsha"] == dup["sha256"]
    # the database is the agent's: `edge-agent results` reads it
    listed = subprocess.run([sys.executable, "-m", "edge_agent", "results", "--db", str(db), "--format", "json"],
                            env=env, capture_output=True, text=True, timeout=60)
    assert listed.returncode == 0, listed.stderr
    assert run["archive"].as_posix() in listed.stdout


# --- without Ray -----------------------------------------------------------------------------------

def test_a_backfill_whose_output_another_run_took_over_stops_and_publishes_nothing_more(
        run: dict[str, Any], tmp_path: Path) -> None:
    """Two backfills on one output folder (a second terminal, a timer firing while the first still runs):
    the later one claims the folder, so the first stops with the reason instead of screening on for nothing."""
    from edge_agent.backfill.output import OutputDir
    from edge_agent.backfill.publish import claim

    out = tmp_path / "out"
    first = subprocess.Popen(_backfill_cmd(run["archive"], out, run["bundle"], "--rows-per-file", "1",
                                           "--batch-rows", "1"),
                             env=agent_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             start_new_session=True)
    try:
        deadline = time.monotonic() + 120  # bounds a hang only
        while _complete_parts(out) == 0 and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert first.poll() is None, first.communicate()[1][-3000:]
        folder = OutputDir(str(out))
        claim(folder)  # the other run
        taken = folder.written().keys.tolist()
        _, err = first.communicate(timeout=120)
    finally:
        try:
            os.killpg(first.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert first.returncode == 3, err[-3000:]
    assert "another backfill took over" in err and "were not published" in err
    assert 0 < len(taken) < len(_inputs(run["archive"]))
    assert folder.written().keys.tolist() == taken  # nothing was published after the other run's claim


def test_listing_ranges_yield_every_line_once_whatever_the_split(tmp_path: Path) -> None:
    import pyarrow.fs as pafs

    from edge_agent.backfill.inputs import byte_ranges, lines_in_range

    lines = [f"/archive/{'x' * (i % 37)}/img_{i}.jpg".encode() for i in range(500)]
    p = tmp_path / "list.txt"
    p.write_bytes(b"\n".join(lines))  # no newline at the end: the last line still counts
    fs = pafs.LocalFileSystem()
    for step in (1, 7, 64, 1000, 10**6):
        got = [ln for s, e in byte_ranges(p.stat().st_size, step) for _, ln in lines_in_range(fs, str(p), s, e)]
        assert got == lines, step


def test_manifest_entries_that_are_missing_unreadable_or_not_files_become_quarantine_reasons(tmp_path: Path) -> None:
    from edge_agent.backfill.inputs import read_input

    img = tmp_path / "a.jpg"
    shutil.copy(sorted(EXAMPLES.glob("*.jpg"))[0], img)
    ok = read_input(str(img), None, 10 << 20)
    assert ok.problem is None and ok.sha256 == hashlib.sha256(img.read_bytes()).hexdigest()
    via_uri = read_input(img.as_uri(), None, 10 << 20)  # the pyarrow filesystem path (object stores use it)
    assert via_uri.problem is None and via_uri.sha256 == ok.sha256 and via_uri.data == ok.data
    assert read_input(str(tmp_path / "gone.jpg"), None, 10 << 20).problem[0] == "not_found"
    assert read_input((tmp_path / "gone.jpg").as_uri(), None, 10 << 20).problem[0] == "not_found"
    assert read_input(tmp_path.as_uri(), None, 10 << 20).problem[0] == "not_regular"
    os.mkfifo(tmp_path / "pipe.jpg")
    assert read_input(str(tmp_path / "pipe.jpg"), None, 10 << 20).problem[0] == "not_regular"
    big = read_input(str(img), None, 1000)
    assert big.problem[0] == "too_large_file" and big.sha256 == ok.sha256
    assert read_input(img.as_uri(), None, 1000).problem[0] == "too_large_file"
    (tmp_path / "upload.jpg.part").write_bytes(img.read_bytes())
    assert read_input(str(tmp_path / "upload.jpg.part"), None, 10 << 20).problem[0] == "abandoned_partial"
    os.symlink("/etc/hostname", tmp_path / "link.jpg")
    assert read_input(str(tmp_path / "link.jpg"), None, 10 << 20).problem[0] == "symlink"
    assert read_input("nosuch://bucket/x.jpg", None, 10 << 20).problem[0] == "unreadable"


def test_a_resume_with_other_arguments_is_refused_before_anything_runs(tmp_path: Path, bundle_dir: Path) -> None:
    from edge_agent.backfill.output import BackfillError
    from edge_agent.backfill.run import prepare
    from edge_agent.config import load_settings

    s = load_settings({"model": bundle_dir, "trusted_keys": (TEST_PUBLIC_KEY,)}, environ={})
    manifest = tmp_path / "list.txt"
    manifest.write_text("# archive\n/archive/a.jpg\n\nb.jpg\n")
    out = tmp_path / "out"
    _, listing, _ = prepare(str(manifest), str(out), s, manifest=True)
    assert listing.entries == 2
    prepare(str(manifest), str(out), s, manifest=True)  # same arguments: fine
    manifest.write_text("/archive/a.jpg\n/archive/c.jpg\n")
    with pytest.raises(BackfillError, match="changed since this backfill started"):
        prepare(str(manifest), str(out), s, manifest=True)
    stricter = load_settings({"model": bundle_dir, "trusted_keys": (TEST_PUBLIC_KEY,),
                              "thresholds": {"melanoma": 0.01}}, environ={})
    with pytest.raises(BackfillError, match="policy"):
        prepare(str(manifest), str(out), stricter, manifest=True)
    with pytest.raises(BackfillError, match="not a folder"):
        prepare(str(manifest), str(tmp_path / "out2"), s, manifest=False)


def test_backfill_without_the_scale_extra_says_what_to_install(tmp_path: Path) -> None:
    """A device install has no Ray: the command must say so instead of a traceback."""
    env = agent_env(PYTHONPATH=str(tmp_path))
    (tmp_path / "ray.py").write_text("raise ImportError('No module named ray (simulated)')\n")
    r = subprocess.run([sys.executable, "-m", "edge_agent", "backfill", str(tmp_path), "-o", str(tmp_path / "o")],
                       env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "edge-derm-screen[scale]" in r.stderr, r.stderr


def test_rows_to_table_carries_new_result_columns(tmp_path: Path) -> None:
    """A column result_row gains later (e.g. a score from a newer bundle) reaches the Parquet rows."""
    from edge_agent.backfill.output import rows_to_table

    t = rows_to_table([{"input_key": 1, "outcome": "result", "sha256": "a", "ood_score": 0.25},
                       {"input_key": 2, "outcome": "quarantine", "reason_code": "not_image"}], ("mel", "nv"))
    assert t.column("ood_score").to_pylist() == [0.25, None]
    assert "p_mel" in t.column_names and t.num_rows == 2


def test_the_device_install_imports_the_agent_and_the_backfill_modules_without_ray_or_pyarrow() -> None:
    """Ray and pyarrow are imported only when a backfill runs: the device (no [scale] extra) never needs them."""
    code = """
import importlib, pkgutil, sys
class Blocker:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("ray", "pyarrow", "pandas"):
            raise ImportError(f"imported {name}")
sys.meta_path.insert(0, Blocker())
import edge_agent, edge_agent.cli, edge_agent.pipeline
import edge_agent.backfill.run, edge_agent.backfill.screen, edge_agent.backfill.merge, edge_agent.backfill.inputs
print("ok")
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=agent_env())
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stdout + r.stderr
