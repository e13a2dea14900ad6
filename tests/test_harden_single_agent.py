"""Issue 16 item 4: two agents on the same inbox or database must never both screen (583 of 600 files were
recorded twice). The second one exits 2 at once, naming the holder; the first one is not disturbed."""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from faults import AgentProc, agent_env, assert_exactly_once, distinct_images, outcome_count, site_args, wait_for, \
    write_images


def second(dirs: dict[str, Path], bundle: Path, cmd: str = "scan", **over: Path) -> tuple[subprocess.CompletedProcess,
                                                                                         float]:
    d = {**dirs, **over}
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "edge_agent", cmd, *site_args(d, bundle)], env=agent_env(),
                       capture_output=True, text=True, timeout=120)
    return r, time.monotonic() - t0


def test_second_agent_on_the_same_inbox_or_database_exits_2_naming_the_holder(procs, dirs, bundle_dir,
                                                                              tmp_path) -> None:
    shas = write_images(dirs["inbox"], distinct_images(8, seed=171))
    a = AgentProc("run", site_args(dirs, bundle_dir, "--quiet-seconds", "0.2"), tmp_path / "a.log", registry=procs)
    wait_for(lambda: outcome_count(dirs["db"]) == 8, what="the first agent's files", proc=a)
    holder = json.loads(Path(str(dirs["db"]) + ".lock").read_text())
    assert holder["pid"] == a.pid and "run" in holder["command"] and holder["started_at"]

    # same inbox, same database; same database, other inbox; same inbox, other database: all refused
    other_inbox = tmp_path / "other-inbox"
    other_inbox.mkdir()
    for cmd, over, what in (("scan", {}, "database"), ("run", {}, "database"),
                            ("scan", {"inbox": other_inbox}, "database"),
                            ("scan", {"db": tmp_path / "other.db"}, "inbox")):
        r, took = second(dirs, bundle_dir, cmd, **over)
        assert r.returncode == 2, (cmd, over, r.stdout, r.stderr)
        assert f"the {what}" in r.stderr and f"pid {a.pid}" in r.stderr, r.stderr
        assert "Traceback" not in r.stderr
        print(f"second {cmd} {over or ''} refused after {took:.1f} s")  # measured, not asserted
    assert a.alive()
    late = write_images(dirs["inbox"], distinct_images(12, seed=172)[8:], prefix="late")
    wait_for(lambda: outcome_count(dirs["db"]) == 12, what="the first agent to go on screening", proc=a)
    a.term()
    assert a.wait(60) == 0, a.log()[-3000:]
    assert_exactly_once(dirs, shas | late)
    assert not (tmp_path / "other.db").exists(), "the refused agent created a database"


def test_two_scans_started_together_screen_every_file_once(dirs, bundle_dir, tmp_path) -> None:
    shas = write_images(dirs["inbox"], distinct_images(40, seed=173))
    cmd = [sys.executable, "-m", "edge_agent", "scan", *site_args(dirs, bundle_dir)]
    ps = [subprocess.Popen(cmd, env=agent_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
          for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in ps]
    codes = sorted(p.returncode for p in ps)
    assert codes in ([0, 2], [0, 0]), (codes, outs)  # [0, 0]: the second started after the first had finished
    if codes == [0, 2]:
        loser = outs[[p.returncode for p in ps].index(2)]
        assert "in use by another process (pid" in loser[1] or "being screened by another process" in loser[1]
    assert_exactly_once(dirs, shas)


def test_locks_are_released_when_the_agent_ends_even_by_sigkill(procs, dirs, bundle_dir, tmp_path) -> None:
    write_images(dirs["inbox"], distinct_images(2, seed=174))
    a = AgentProc("run", site_args(dirs, bundle_dir), tmp_path / "a.log", registry=procs)
    wait_for(lambda: outcome_count(dirs["db"]) == 2, what="the files", proc=a)
    a.kill()
    r, _ = second(dirs, bundle_dir)
    assert r.returncode == 0, r.stderr
