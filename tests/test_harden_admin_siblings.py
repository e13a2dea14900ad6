"""Issue 16 items 2, 4-7, 9, tried again from outside: a careless administrator and filesystem tricks.

Every case runs the real CLI in a subprocess against real folders and a real
SQLite file; where the point is a full or read-only file system, a real tmpfs
or a read-only bind mount is used (skipped with the reason when not root).
Each test says what used to happen.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from faults import (AgentProc, agent_env, assert_exactly_once, distinct_images, outcome_rows, sha_file, site_args,
                    wait_for, write_images)


def cli(*args: str, env: dict[str, str] | None = None, timeout: float = 120, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edge_agent", *args], env=env or agent_env(), capture_output=True,
                          text=True, timeout=timeout, **kw)


def refused(r: subprocess.CompletedProcess, *words: str, code: int = 2) -> None:
    assert r.returncode == code, (r.returncode, r.stdout, r.stderr)
    assert "Traceback" not in r.stderr + r.stdout, r.stderr
    for w in words:
        assert w in r.stderr, (w, r.stderr)


def start_run(dirs: dict[str, Path], bundle: Path, procs: list, *extra: str) -> AgentProc:
    a = AgentProc("run", site_args(dirs, bundle, "--rescan-seconds", "1", *extra), dirs["root"] / "run.log",
                  registry=procs)
    wait_for(lambda: "watching" in a.log(), 60, "the agent to start", proc=a)
    return a


# --- the inbox folder itself swapped while `run` works -----------------------------------------------------

@pytest.mark.parametrize("how", ["symlink", "recreated", "deleted"])
def test_inbox_folder_itself_swapped_under_run_stops_the_agent_and_touches_nothing_outside(
        dirs, bundle_dir, procs, tmp_path, how) -> None:
    """Before: the root was reopened by path at every operation; an inbox renamed away and replaced by a symbolic
    link to another folder had that folder's files read, recorded and moved into processed/ at the next rescan;
    a recreated inbox was silently no longer watched. Now the inbox is pinned at start: the agent stops with exit
    3 and says what happened; nothing outside the original inbox is touched; a restart takes the new folder."""
    first = write_images(dirs["inbox"], distinct_images(2, seed=301), prefix="first")
    a = start_run(dirs, bundle_dir, procs)
    wait_for(lambda: len(outcome_rows(dirs["db"])) == 2, 60, "the first images", proc=a)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    other = write_images(elsewhere, distinct_images(3, seed=302), prefix="other")
    os.rename(dirs["inbox"], dirs["root"] / "inbox.old")
    if how == "symlink":
        os.symlink(elsewhere, dirs["inbox"])
    elif how == "recreated":
        dirs["inbox"].mkdir()
        shutil.copy(elsewhere / "other_0000.jpg", dirs["inbox"] / "other_0000.jpg")
    assert a.wait(60) == 3, a.log()
    log = a.log()
    assert "Traceback" not in log
    assert f"the inbox {dirs['inbox']} was" in log and "start the agent again" in log, log
    assert sorted(p.name for p in elsewhere.iterdir()) == sorted(other)
    assert {r["original_name"] for r in outcome_rows(dirs["db"])} == set(first)  # nothing from elsewhere
    for n in other:
        assert sha_file(elsewhere / n) == other[n]
    if how == "recreated":  # the restarted agent screens the new folder, once
        r = cli("scan", *site_args(dirs, bundle_dir))
        assert r.returncode == 0, r.stderr
        assert {r["original_name"] for r in outcome_rows(dirs["db"])} == {*first, "other_0000.jpg"}
