"""`scan` and `run` judge a possibly incomplete file alike, and `status` names the files that wait (issue 17).

Before: `scan` quarantined a truncated file at once while `run` waited partial_timeout_seconds (10
minutes) for the rest of it, so the same half-copied file was "quarantined: truncated" or "waiting"
depending on the mode; and `status` said "2 file(s) waiting" without saying which, how old, or why.

Now one rule for both modes: an empty or truncated file is quarantined once unchanged for
partial_timeout_seconds (judged from its own timestamps when found at start); a younger one stays in
the inbox. `scan` does not wait for it: it names it ("left in the inbox ... possibly still being
copied") and exits 1 (files without an outcome). `status` lists the waiting files with their age and
why. Real CLI subprocesses, a real database, real folders.
"""
from __future__ import annotations

import json
import os
import shutil
import sqlite3
import time
from pathlib import Path

from conftest import rows, run_agent
from bundle_factory import TEST_PUBLIC_KEY


def _scan(dirs: dict[str, Path], bundle: Path, *extra: str):
    return run_agent("scan", "--inbox", str(dirs["inbox"]), "--db", str(dirs["db"]), "--model", str(bundle),
                     "--trusted-keys", str(TEST_PUBLIC_KEY), "--workers", "1", "--threads", "1",
                     "--quiet-seconds", "0", *extra)


def test_scan_leaves_a_young_truncated_file_and_names_it(dirs, bundle_dir, example_images) -> None:
    good = example_images[0].read_bytes()
    (dirs["inbox"] / "half.jpg").write_bytes(good[: len(good) // 2])
    (dirs["inbox"] / "upload.jpg.part").write_bytes(good[:1000])
    shutil.copy(example_images[1], dirs["inbox"] / "fine.jpg")
    r = _scan(dirs, bundle_dir)
    assert r.returncode == 1, r.stdout + r.stderr  # a file without an outcome: "run scan again"
    assert "left in the inbox: half.jpg (truncated: possibly still being copied" in r.stdout, r.stdout
    assert "left in the inbox: upload.jpg.part (temporary upload name" in r.stdout, r.stdout
    assert "quarantined once unchanged for 600 s" in r.stdout
    assert (dirs["inbox"] / "half.jpg").read_bytes() == good[: len(good) // 2]
    assert rows(dirs["db"], "SELECT * FROM quarantine") == []
    assert len(rows(dirs["db"], "SELECT id FROM results")) == 1

    # the rest of the copy arrives: the next scan screens it, like `run` would
    (dirs["inbox"] / "half.jpg").write_bytes(good)
    r = _scan(dirs, bundle_dir)
    assert "half.jpg" not in r.stdout and len(rows(dirs["db"], "SELECT id FROM results")) == 2, r.stdout


def test_scan_quarantines_a_truncated_file_unchanged_for_the_partial_timeout(dirs, bundle_dir,
                                                                             example_images) -> None:
    good = example_images[0].read_bytes()
    (dirs["inbox"] / "half.jpg").write_bytes(good[: len(good) // 2])
    time.sleep(0.3)  # older than the partial timeout below (ctime cannot be set back)
    r = _scan(dirs, bundle_dir, "--partial-timeout-seconds", "0.2")
    assert r.returncode == 0, r.stdout + r.stderr
    q = rows(dirs["db"], "SELECT reason_code, reason FROM quarantine")
    assert [x["reason_code"] for x in q] == ["truncated"] and "unchanged for 0.2 s" in q[0]["reason"], q
    assert "left in the inbox" not in r.stdout


def test_status_names_the_waiting_files_with_age_and_why(dirs, bundle_dir, example_images) -> None:
    good = example_images[0].read_bytes()
    (dirs["inbox"] / "half.jpg").write_bytes(good[: len(good) // 2])
    (dirs["inbox"] / "sub").mkdir()
    (dirs["inbox"] / "sub" / "upload.jpg.part").write_bytes(good[:1000])
    assert _scan(dirs, bundle_dir).returncode == 1
    shutil.copy(example_images[2], dirs["inbox"] / "late.jpg")  # arrived after the scan: nobody is running
    old = time.time() - 3600
    os.utime(dirs["inbox"] / "late.jpg", (old, old))

    st = run_agent("status", "--db", str(dirs["db"]))
    assert "inbox backlog:   2 file(s) waiting" in st.stdout, st.stdout
    assert "1 upload(s) under a temporary name" in st.stdout
    lines = {ln.split(" (changed")[0].strip(): ln for ln in st.stdout.splitlines() if "(changed " in ln}
    assert set(lines) == {"half.jpg", "late.jpg", "sub/upload.jpg.part"}, st.stdout
    assert "looks incomplete (truncated file), possibly still being copied" in lines["half.jpg"]
    assert "quarantined if unchanged for 600 s" in lines["half.jpg"]
    assert "the agent is not running" in lines["late.jpg"]
    assert "temporary upload name" in lines["sub/upload.jpg.part"]

    for flag in (["--format", "json"], ["--json"]):
        js = json.loads(run_agent("status", "--db", str(dirs["db"]), *flag).stdout)
        assert {w["file"] for w in js["waiting"]} == {"half.jpg", "late.jpg", "sub/upload.jpg.part"}
        assert all(w["age_seconds"] >= 0 and w["why"] for w in js["waiting"])
        assert js["backlog"] == 2 and js["uploads_in_progress"] == 1


def test_status_names_what_the_running_daemon_waits_for(procs, dirs, bundle_dir, example_images) -> None:
    """`run` defers a truncated file (it may still grow); `status` says which file, how old, and why."""
    import subprocess

    from conftest import agent_cmd, agent_env, wait_for

    p = subprocess.Popen(agent_cmd("run", "--inbox", str(dirs["inbox"]), "--db", str(dirs["db"]), "--model",
                                   str(bundle_dir), "--trusted-keys", str(TEST_PUBLIC_KEY), "--workers", "1",
                                   "--threads", "1", "--quiet-seconds", "0.2"),
                         env=agent_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    procs.append(p)
    good = example_images[0].read_bytes()
    def started() -> bool:
        try:
            return bool(rows(dirs["db"], "SELECT value FROM agent_state WHERE key = 'heartbeat'"))
        except sqlite3.Error:  # not created yet
            return False

    wait_for(started, timeout=60, what="the agent's first state")
    (dirs["inbox"] / "half.jpg").write_bytes(good[: len(good) // 2])

    def named() -> str | None:
        st = run_agent("status", "--db", str(dirs["db"]))
        return st.stdout if "looks incomplete (truncated file)" in st.stdout else None

    out = wait_for(named, timeout=60, what="status naming the deferred file")
    assert "agent:           running" in out
    line = next(ln for ln in out.splitlines() if ln.strip().startswith("half.jpg (changed "))
    assert "possibly still being copied" in line and "quarantined if unchanged for 600 s" in line, out
    assert rows(dirs["db"], "SELECT * FROM quarantine") == []
    (dirs["inbox"] / "half.jpg").write_bytes(good)  # the rest arrives: screened, no longer waiting
    wait_for(lambda: rows(dirs["db"], "SELECT id FROM results"), timeout=60, what="the completed file's result")
    p.terminate()
    assert p.wait(60) == 0
