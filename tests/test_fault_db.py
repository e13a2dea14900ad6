"""Fault 4: database contention. Another process holds the results database for 10+ seconds.

A long read transaction (a clinician's datasette, a backup) must not stop
screening at all in WAL mode. A write lock held open (an sqlite3 shell left
in BEGIN) blocks every commit: the agent must wait and retry, lose nothing,
and say in the log what it is waiting for - both while running and when it
starts while the lock is held.
"""
from __future__ import annotations

import subprocess
import sys
import textwrap
import time
from pathlib import Path

from faults import (AgentProc, assert_exactly_once, distinct_images, outcome_count, site_args, wait_for,
                    write_images)

HOLD_SECONDS = 11.0
HOLDER = textwrap.dedent("""
    import sqlite3, sys, time
    db, mode, seconds, ready = sys.argv[1], sys.argv[2], float(sys.argv[3]), sys.argv[4]
    conn = sqlite3.connect(db, isolation_level=None, timeout=30)
    if mode == "read":
        conn.execute("BEGIN")
        conn.execute("SELECT count(*) FROM results").fetchone()  # a read snapshot stays open
    else:
        conn.execute("BEGIN IMMEDIATE")  # the write lock, as an sqlite3 shell left in a transaction holds it
        conn.execute("INSERT INTO events (at, kind, detail) VALUES ('2026-01-01T00:00:00.000Z', 'lock-test', '')")
    open(ready, "w").close()
    time.sleep(seconds)
    conn.execute("COMMIT" if mode == "write" else "END")
    conn.close()
""")


def hold(db: Path, mode: str, seconds: float, tmp_path: Path) -> subprocess.Popen:
    ready = tmp_path / f"holding-{mode}"
    ready.unlink(missing_ok=True)
    p = subprocess.Popen([sys.executable, "-c", HOLDER, str(db), mode, str(seconds), str(ready)])
    wait_for(lambda: ready.exists() or p.poll() is not None, what=f"the {mode} lock")
    assert p.poll() is None, f"could not take the {mode} lock"
    return p


def start(procs, dirs, bundle, tmp_path, name: str) -> AgentProc:
    return AgentProc("run", site_args(dirs, bundle, "--quiet-seconds", "0.2", "--log-level", "INFO"),
                     tmp_path / name, registry=procs)


def test_long_read_transaction_does_not_stop_screening(procs, dirs, bundle_dir, tmp_path) -> None:
    images = distinct_images(40, seed=21)
    shas = write_images(dirs["inbox"], images[:10], prefix="before")
    a = start(procs, dirs, bundle_dir, tmp_path, "agent.log")
    wait_for(lambda: outcome_count(dirs["db"]) == 10, what="the first files", proc=a)
    reader = hold(dirs["db"], "read", HOLD_SECONDS, tmp_path)
    shas |= write_images(dirs["inbox"], images[10:], prefix="during")
    # screened while the reader still holds its snapshot
    wait_for(lambda: outcome_count(dirs["db"]) == 40, timeout=HOLD_SECONDS - 1, what="screening during the read",
             proc=a)
    assert reader.poll() is None, "the reader let go too early; the test proves nothing"
    assert reader.wait(30) == 0
    a.term()
    assert a.wait(60) == 0, a.log()[-3000:]
    assert_exactly_once(dirs, shas)


def test_write_lock_held_for_seconds_makes_the_agent_wait_and_say_so(procs, dirs, bundle_dir, tmp_path) -> None:
    images = distinct_images(36, seed=22)
    shas = write_images(dirs["inbox"], images[:5], prefix="first")
    a = start(procs, dirs, bundle_dir, tmp_path, "agent.log")
    wait_for(lambda: outcome_count(dirs["db"]) == 5, what="the first files", proc=a)
    t0 = time.monotonic()
    writer = hold(dirs["db"], "write", HOLD_SECONDS, tmp_path)
    shas |= write_images(dirs["inbox"], images[5:30], prefix="locked")
    wait_for(lambda: "is locked by another process" in a.log(), what="the agent to say what it waits for", proc=a)
    assert outcome_count(dirs["db"]) == 5 and writer.poll() is None
    assert writer.wait(30) == 0
    wait_for(lambda: outcome_count(dirs["db"]) == 30, what="the files to be recorded after the lock", proc=a)
    assert time.monotonic() - t0 >= HOLD_SECONDS - 1
    a.term()
    assert a.wait(60) == 0, a.log()[-3000:]
    log = a.log()
    assert "waiting for it to commit or close" in log and "can be written again" in log
    assert "Traceback" not in log
    assert_exactly_once(dirs, shas)

    # Started while another process holds the write lock: it waits at start-up (saying so), then screens.
    shas |= write_images(dirs["inbox"], images[30:], prefix="restart")
    writer = hold(dirs["db"], "write", 4.0, tmp_path)
    b = start(procs, dirs, bundle_dir, tmp_path, "restart.log")
    wait_for(lambda: "is locked by another process" in b.log(), what="the agent to say what it waits for", proc=b)
    assert b.alive() and writer.poll() is None
    assert writer.wait(30) == 0
    wait_for(lambda: outcome_count(dirs["db"]) == 36, what="the files after the lock", proc=b)
    b.term()
    assert b.wait(60) == 0, b.log()[-3000:]
    assert "Traceback" not in b.log()
    assert_exactly_once(dirs, shas)
