"""Fault 1: crash anywhere. SIGKILL `edge-agent run` again and again over 300+ images, restart each time.

Kills come from two sources: the EDGE_AGENT_CRASH_AT hook, which makes the
agent SIGKILL itself at the most delicate points (inside a database
transaction before COMMIT, between COMMIT and the file moves, half-way through
a batch of moves, after the moves but before their bookkeeping, inside the
bookkeeping transaction), each at a different commit of the run; and plain
SIGKILLs from outside at random moments (start-up, reconcile, decoding,
inference, anything). After every kill the database must pass
`PRAGMA integrity_check` and no file may have two outcomes; at the end every
input has exactly one outcome, every recorded file lies where its row says
with the content its row says, and the inbox is empty.
"""
from __future__ import annotations

import random
import shutil
import signal
import time
from pathlib import Path

from faults import (AgentProc, agent_env, assert_exactly_once, distinct_images, inbox_files, integrity, outcome_count,
                    outcome_rows, sha, site_args, wait_for, write_images)
from conftest import rows

N_IMAGES = 700  # at least 300; extra so that even a fast machine has work left at every kill
# (crash point, n-th time it is reached) for the hook rounds; None: a random SIGKILL from outside.
SCHEDULE: list[tuple[str, int] | None] = [
    ("in_commit", 1), None, ("after_commit", 2), ("mid_move", 1), None, ("after_move", 1), ("in_file_state", 2),
    None, ("in_commit", 3), ("mid_move", 2), None, ("after_commit", 1), ("after_move", 3), None,
    ("in_file_state", 1), None,
]
EXTRA = ("--batch-size", "2", "--queue-max", "4", "--workers", "1", "--partial-timeout-seconds", "1",
         "--quiet-seconds", "0.5",
         "--rescan-seconds", "2", "--log-level", "INFO")


def check_no_double_counting(db: Path) -> None:
    """Invariant at every point in time, not only at the end: one row per file, one result per content."""
    rows = outcome_rows(db)
    paths = [r["original_path"] for r in rows]
    assert len(paths) == len(set(paths)), "a file has two outcome rows"
    res = [r["sha256"] for r in rows if r["table"] == "results"]
    assert len(res) == len(set(res)), "a content has two results"


def test_sigkill_at_many_points_then_restart_loses_and_duplicates_nothing(procs, dirs, bundle_dir,
                                                                           tmp_path) -> None:
    inbox = dirs["inbox"]
    shas = write_images(inbox, distinct_images(N_IMAGES, seed=11))
    for i in range(4):  # identical copies: claims and duplicate rows are part of the crash too
        shutil.copy(inbox / f"img_{i:04d}.jpg", inbox / f"copy_{i}.jpg")
        shas[f"copy_{i}.jpg"] = shas[f"img_{i:04d}.jpg"]
    (inbox / "broken.jpg").write_bytes(b"this is a text file named .jpg\n")
    data = (inbox / f"img_{N_IMAGES - 1:04d}.jpg").read_bytes()
    (inbox / "cut.jpg").write_bytes(data[: len(data) // 2])
    shas["broken.jpg"] = sha((inbox / "broken.jpg").read_bytes())
    shas["cut.jpg"] = sha((inbox / "cut.jpg").read_bytes())
    bad = {"broken.jpg", "cut.jpg"}

    rng = random.Random(20261121)
    kills: list[str] = []
    randoms = 0
    for i, step in enumerate(SCHEDULE):
        before = len(inbox_files(inbox))
        log = tmp_path / f"agent-{i:02d}.log"
        if step is not None:
            point, nth = step
            a = AgentProc("run", site_args(dirs, bundle_dir, *EXTRA), log, registry=procs,
                          env=agent_env(EDGE_AGENT_CRASH_AT=f"{point}:{nth}"))
            try:
                code = a.wait(60)
            except Exception:
                raise AssertionError(f"round {i}: the agent never reached crash point {point} #{nth}\n"
                                     + a.log()[-3000:]) from None
            assert code == -signal.SIGKILL, f"round {i}: exit {code}\n" + a.log()[-3000:]
            assert f"EDGE_AGENT_CRASH_AT={point}:{nth}" in a.log()
            what = f"hook {point} #{nth}"
        else:
            rows_before = outcome_count(dirs["db"])
            a = AgentProc("run", site_args(dirs, bundle_dir, *EXTRA), log, registry=procs, env=agent_env())
            randoms += 1
            if randoms % 2:  # during start-up: imports, migration, reconcile, model load, first scan
                delay = rng.uniform(0.05, 0.5)
                t0 = time.monotonic()  # ...but still in start-up: a fast machine may already be screening
                while time.monotonic() - t0 < delay and outcome_count(dirs["db"]) == rows_before and a.alive():
                    time.sleep(0.002)
                delay = time.monotonic() - t0
                what = f"random SIGKILL {delay:.2f} s after start"
            else:  # while screening: a random moment after the first new row
                wait_for(lambda: outcome_count(dirs["db"]) > rows_before, timeout=60, what="progress", proc=a,
                         interval=0.002)
                delay = rng.uniform(0.0, 0.05)
                time.sleep(delay)
                what = f"random SIGKILL {delay * 1000:.0f} ms into screening"
            assert a.alive(), a.log()[-3000:]
            code = a.kill()
            assert code == -signal.SIGKILL
        assert integrity(dirs["db"]) == "ok", f"round {i} ({what}): database damaged"
        check_no_double_counting(dirs["db"])
        after = len(inbox_files(inbox))
        kills.append(f"{what}: inbox {before} -> {after} files, {len(outcome_rows(dirs['db']))} rows")
        assert after > 0, "the inbox emptied before every kill point was exercised; add images:\n" + "\n".join(kills)
    print("\n".join(kills))

    # A last, undisturbed run finishes everything, and stops cleanly on SIGTERM.
    log = tmp_path / "agent-final.log"
    a = AgentProc("run", site_args(dirs, bundle_dir, *EXTRA), log, registry=procs, env=agent_env())
    wait_for(lambda: not inbox_files(inbox) and len(outcome_rows(dirs["db"])) == len(shas)
             and all(r["file_state"] == "moved" for r in outcome_rows(dirs["db"])),
             timeout=120, what="every file to be finished", proc=a)
    a.term()
    assert a.wait(60) == 0, a.log()[-3000:]
    # Two kills in a row (at any crash point) while the same file sat in a decode worker condemn it by the
    # poison-pill rule (poison.py: "died twice in a row while decoding it"): that is an outcome, not a loss,
    # and with pipelined decoding this schedule can produce it; anything else quarantined is a failure.
    condemned = {r["original_name"] for r in rows(dirs["db"], "SELECT original_name FROM quarantine "
                                                              "WHERE reason_code = 'crashed_decoder'")}
    assert len(condemned) <= 2, condemned
    counts = assert_exactly_once(dirs, shas, set(bad) | condemned)
    assert counts["duplicates"] == 4
    assert len(kills) >= 10
