"""`edge-agent run` as a real subprocess: systemd notify, SIGTERM, and SIGKILL at the worst moments.

The crash tests check the invariant that matters: after a kill and a restart
every inbox file has exactly one outcome, nothing was lost, nothing recorded
twice. EDGE_AGENT_CRASH_AT makes the agent SIGKILL itself right after a
commit (before its files are moved), the most delicate point; the other test
kills it from outside at whatever point it has reached.
"""
from __future__ import annotations

import hashlib
import signal
import socket
import subprocess
import uuid
from pathlib import Path

import pytest

from conftest import agent_cmd, agent_env, rows, run_agent, variant_jpegs, wait_for


def run_args(dirs: dict[str, Path], bundle: Path, *extra: str) -> list[str]:
    return ["--inbox", str(dirs["inbox"]), "--db", str(dirs["db"]), "--model", str(bundle), "--workers", "2",
            "--threads", "1", *extra]


def start(procs: list, dirs: dict[str, Path], bundle: Path, *extra: str, **env: str) -> subprocess.Popen:
    p = subprocess.Popen(agent_cmd("run", *run_args(dirs, bundle, *extra)), env=agent_env(**env),
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    procs.append(p)
    return p


def count(db: Path, table: str) -> int:
    if not db.exists():
        return 0
    try:
        return rows(db, f"SELECT count(*) FROM {table}")[0][0]
    except Exception:  # schema not created yet
        return 0


def check_every_file_has_one_outcome(dirs: dict[str, Path], shas: dict[str, str], bad: set[str]) -> None:
    """shas: original name -> sha256 of every file that entered the inbox; bad: names that must be quarantined."""
    res = rows(dirs["db"], "SELECT original_name, sha256, file_state, stored_path FROM results")
    dup = rows(dirs["db"], "SELECT original_name, sha256, file_state, stored_path FROM duplicates")
    qua = rows(dirs["db"], "SELECT original_name FROM quarantine")
    names = [r[0] for r in res] + [r[0] for r in dup] + [r[0] for r in qua]
    assert sorted(names) == sorted(shas), "every file exactly once"
    assert {r[0] for r in qua} == bad
    assert len({r["sha256"] for r in res}) == len(res) == len({v for k, v in shas.items() if k not in bad})
    for r in [*res, *dup]:
        assert r["file_state"] == "moved" and r["sha256"] == shas[r["original_name"]]
        assert hashlib.sha256(Path(r["stored_path"]).read_bytes()).hexdigest() == r["sha256"]  # nothing lost
    assert [p for p in dirs["inbox"].rglob("*") if p.is_file()] == []


def test_systemd_notify_and_sigterm(procs, dirs, bundle_dir, example_images) -> None:
    name = f"edge-agent-test-{uuid.uuid4().hex}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name)
    sock.settimeout(60)
    try:
        p = start(procs, dirs, bundle_dir, NOTIFY_SOCKET="@" + name, WATCHDOG_USEC="400000")
        seen: list[str] = []

        def until(field: str) -> None:
            while field not in seen:
                seen.extend(sock.recv(4096).decode().splitlines())

        until("READY=1")
        assert any(x.startswith("MAINPID=") for x in seen)
        (dirs["inbox"] / "a.jpg").write_bytes(example_images[0].read_bytes())
        wait_for(lambda: count(dirs["db"], "results") == 1, what="a result")
        until("WATCHDOG=1")
        p.send_signal(signal.SIGTERM)
        until("STOPPING=1")
        out, _ = p.communicate(timeout=60)
        assert p.returncode == 0, out
        assert "\x1b[" not in out  # no colours when not on a terminal
        assert all(line.count("\n") == 0 for line in out.splitlines())
    finally:
        sock.close()
    st = rows(dirs["db"], "SELECT value FROM agent_state WHERE key = 'stopped_at'")
    assert st and st[0][0]  # a clean stop is recorded


def test_sigterm_during_a_busy_inbox_finishes_cleanly(procs, dirs, bundle_dir, example_images) -> None:
    files = variant_jpegs(example_images, dirs["inbox"], 40)
    shas = {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in files}
    p = start(procs, dirs, bundle_dir, "--batch-size", "2", "--queue-max", "4")
    wait_for(lambda: count(dirs["db"], "results") >= 1, timeout=60, what="first result")
    p.send_signal(signal.SIGTERM)
    out, _ = p.communicate(timeout=60)
    assert p.returncode == 0, out
    # whatever was committed was also moved; the rest is still in the inbox, untouched
    assert rows(dirs["db"], "SELECT count(*) FROM results WHERE file_state != 'moved'")[0][0] == 0
    left = {f.name for f in dirs["inbox"].iterdir()}
    done = {r[0] for r in rows(dirs["db"], "SELECT original_name FROM results")}
    assert left | done == set(shas) and not (left & done)


@pytest.mark.parametrize("how", ["after_commit", "after_move", "external"])
def test_sigkill_mid_batch_then_restart_loses_and_duplicates_nothing(procs, dirs, bundle_dir, example_images,
                                                                     how: str) -> None:
    files = variant_jpegs(example_images, dirs["inbox"], 36)
    for i in range(4):  # true duplicates too, so claims and duplicate rows are part of the crash
        (dirs["inbox"] / f"copy_{i}.jpg").write_bytes(files[i].read_bytes())
    (dirs["inbox"] / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really")
    shas = {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in dirs["inbox"].iterdir()}
    extra = ("--batch-size", "4", "--queue-max", "8")
    if how != "external":
        p = start(procs, dirs, bundle_dir, *extra, EDGE_AGENT_CRASH_AT=how)
    else:
        p = start(procs, dirs, bundle_dir, *extra)
        wait_for(lambda: count(dirs["db"], "results") >= 3, timeout=60, what="some results")
        p.kill()
    p.communicate(timeout=60)
    assert p.returncode == -signal.SIGKILL
    pending = rows(dirs["db"], "SELECT original_path, stored_path FROM results WHERE file_state = 'pending'")
    if how == "after_commit":  # killed right after the first commit: rows exist whose files did not move
        assert pending and all(Path(r[0]).exists() for r in pending)
    elif how == "after_move":  # killed after the move, before its bookkeeping
        assert pending and all(not Path(r[0]).exists() and Path(r[1]).exists() for r in pending)
    print(f"killed with {count(dirs['db'], 'results')} results, {len(list(dirs['inbox'].iterdir()))} files left")

    # broken.jpg looks truncated: scan, like run, quarantines it once unchanged for partial_timeout_seconds
    again = run_agent("scan", *run_args(dirs, bundle_dir, *extra, "--partial-timeout-seconds", "0.01"))
    assert again.returncode == 0, again.stdout + again.stderr
    check_every_file_has_one_outcome(dirs, shas, bad={"broken.jpg"})
