"""Fault 7: shutdown. SIGTERM during a batch: the batch finishes or is rolled back cleanly, exit code 0,
within the stop timeout of the shipped systemd unit (TimeoutStopSec), even when the database is locked."""
from __future__ import annotations

import time
from pathlib import Path

from faults import (AgentProc, assert_exactly_once, distinct_images, inbox_files, outcome_count, outcome_rows,
                    sha_file, site_args, unit_timeout_stop, wait_for, write_images)
from test_fault_db import hold


def stopped_cleanly(dirs: dict[str, Path], shas: dict[str, str]) -> None:
    """After a stop: every row's file was moved, every other file is still in the inbox, unchanged."""
    rows = outcome_rows(dirs["db"])
    assert all(r["file_state"] == "moved" for r in rows), "a committed file was left half-done"
    left = {p.name: sha_file(p) for p in inbox_files(dirs["inbox"])}
    assert set(left) | {r["original_name"] for r in rows} == set(shas)
    assert not set(left) & {r["original_name"] for r in rows}
    assert all(shas[n] == h for n, h in left.items())


def restart_and_finish(procs, dirs: dict[str, Path], bundle_dir: Path, tmp_path: Path, shas: dict[str, str],
                       limit: float) -> None:
    """What the stopped agent left in the inbox is screened by the next start, each file exactly once."""
    b = AgentProc("run", site_args(dirs, bundle_dir), tmp_path / "again.log", registry=procs)
    wait_for(lambda: not inbox_files(dirs["inbox"]) and outcome_count(dirs["db"]) == len(shas), proc=b,
             what="the rest after the restart")
    b.term()
    assert b.wait(limit) == 0
    assert_exactly_once(dirs, shas)


def test_sigterm_during_a_batch_exits_0_within_the_stop_timeout(procs, dirs, bundle_dir, tmp_path) -> None:
    limit = unit_timeout_stop()
    shas = write_images(dirs["inbox"], distinct_images(300, seed=41))
    a = AgentProc("run", site_args(dirs, bundle_dir, "--batch-size", "8", "--queue-max", "16"),
                  tmp_path / "agent.log", registry=procs)
    wait_for(lambda: outcome_count(dirs["db"]) >= 1, what="the first results", proc=a, interval=0.005)
    t0 = time.monotonic()
    a.term()
    code = a.wait(limit)
    took = time.monotonic() - t0
    assert code == 0, a.log()[-3000:]
    assert took < limit, f"stopping took {took:.1f} s, more than TimeoutStopSec={limit:.0f}"
    assert inbox_files(dirs["inbox"]), "everything was done before the signal; the test proves nothing"
    stopped_cleanly(dirs, shas)
    assert "stopped:" in a.log()

    restart_and_finish(procs, dirs, bundle_dir, tmp_path, shas, limit)


def test_sigterm_while_the_database_is_locked_rolls_back_within_the_stop_timeout(procs, dirs, bundle_dir,
                                                                                 tmp_path) -> None:
    limit = unit_timeout_stop()
    images = distinct_images(20, seed=42)
    shas = write_images(dirs["inbox"], images[:4], prefix="first")
    a = AgentProc("run", site_args(dirs, bundle_dir, "--quiet-seconds", "0.2", "--log-level", "INFO"),
                  tmp_path / "agent.log", registry=procs)
    wait_for(lambda: outcome_count(dirs["db"]) == 4, what="the first files", proc=a)
    writer = hold(dirs["db"], "write", limit + 10, tmp_path)  # held longer than systemd would wait
    try:
        shas |= write_images(dirs["inbox"], images[4:], prefix="locked")
        wait_for(lambda: "is locked by another process" in a.log(), what="the agent to wait for the lock", proc=a)
        t0 = time.monotonic()
        a.term()
        code = a.wait(limit)
        took = time.monotonic() - t0
    finally:
        writer.kill()
        writer.wait()
    assert code == 0, a.log()[-3000:]
    assert took < limit, f"stopping took {took:.1f} s, more than TimeoutStopSec={limit:.0f}"
    assert "they stay in the inbox and are screened at the next start" in a.log()
    stopped_cleanly(dirs, shas)
    assert len(inbox_files(dirs["inbox"])) == 16  # rolled back: nothing of the locked batch was recorded

    restart_and_finish(procs, dirs, bundle_dir, tmp_path, shas, limit)
