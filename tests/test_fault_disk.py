"""Fault 5: disk full and read-only output. The agent stops taking files, keeps the inbox intact, says so in
`status` and the log, and resumes by itself when the condition clears.

With root and `mount` (as in CI's container) the disks are real: a small
tmpfs that is filled to the last byte, and a tmpfs for processed/ that is
remounted read-only. Where mounting is impossible those tests skip, and the
injected-fault test below (ENOSPC from the move, "database or disk is full"
from SQLite) still covers the same code paths in-process.
"""
from __future__ import annotations

import errno
import os
import shutil
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from faults import (AgentProc, assert_exactly_once, distinct_images, inbox_files, outcome_count, outcome_rows,
                    sha_file, site_args, wait_for, write_images)


def _mount(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["mount", *args], capture_output=True, text=True)


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[callable]:
    """mount_tmpfs(path, size) -> path; skips when this machine cannot mount (not root, no permission)."""
    mounted: list[Path] = []

    def mount_tmpfs(where: Path, size: str) -> Path:
        if os.geteuid() != 0 or shutil.which("mount") is None:
            pytest.skip("needs root and mount(8) to create a small real disk (tmpfs); the injected-fault test "
                        "covers the same paths")
        where.mkdir(parents=True, exist_ok=True)
        r = _mount("-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(where))
        if r.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here ({r.stderr.strip()}); the injected-fault test covers this")
        mounted.append(where)
        return where

    yield mount_tmpfs
    for m in reversed(mounted):
        subprocess.run(["umount", "-l", str(m)], capture_output=True)


def fill(disk: Path) -> Path:
    """Fill the file system to the last byte; returns the filler file."""
    filler = disk / "filler"
    with open(filler, "wb", buffering=0) as f:
        for chunk in (1 << 20, 1 << 14, 1 << 10, 64, 1):
            try:
                while True:
                    f.write(b"\0" * chunk)
            except OSError as e:
                assert e.errno == errno.ENOSPC
    assert shutil.disk_usage(disk).free < 64 * 1024
    return filler


def status(db: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edge_agent", "status", "--db", str(db)], capture_output=True,
                          text=True, timeout=60)


def test_full_disk_pauses_intake_keeps_the_inbox_and_resumes(procs, tmpfs, tmp_path, bundle_dir) -> None:
    disk = tmpfs(tmp_path / "disk", "24m")
    site = disk / "site"
    dirs = {"root": site, "inbox": site / "inbox", "db": site / "db" / "results.db"}
    dirs["inbox"].mkdir(parents=True)
    images = distinct_images(25, seed=31)
    shas = write_images(dirs["inbox"], images[:5], prefix="before")
    a = AgentProc("run", site_args(dirs, bundle_dir, "--min-free-mb", "2", "--quiet-seconds", "0.2",
                                   "--log-level", "INFO"), tmp_path / "agent.log", registry=procs)
    wait_for(lambda: outcome_count(dirs["db"]) == 5, what="the first files", proc=a)
    staging = disk / "staging"
    later = write_images(staging, images[5:], prefix="later")
    filler = fill(disk)
    wait_for(lambda: "pausing intake" in a.log() or "is full" in a.log(), timeout=60,
             what="the agent to notice the full disk", proc=a)
    done = outcome_count(dirs["db"])
    for name in later:  # files arriving while the disk is full (a rename needs no space)
        os.rename(staging / name, dirs["inbox"] / name)
    shas |= later
    time.sleep(2.0)
    assert a.alive()
    assert outcome_count(dirs["db"]) == done, "files were taken while the disk was full"
    assert {p.name: sha_file(p) for p in inbox_files(dirs["inbox"])} == later, "the inbox is intact"
    st = status(dirs["db"])
    assert st.returncode == 1 and "low disk space" in st.stderr and str(disk) in st.stderr, st.stdout + st.stderr
    assert not list((site / "processed").rglob("*edge-agent-tmp*")), "no half-copied files"

    filler.unlink()
    wait_for(lambda: outcome_count(dirs["db"]) == 25 and not inbox_files(dirs["inbox"]), timeout=60,
             what="the agent to resume by itself", proc=a)
    a.term()
    assert a.wait(60) == 0, a.log()[-3000:]
    assert "Traceback" not in a.log()
    assert_exactly_once(dirs, shas)
    assert status(dirs["db"]).returncode == 0


def test_read_only_processed_folder_pauses_and_resumes(procs, tmpfs, dirs, tmp_path, bundle_dir) -> None:
    processed = tmpfs(dirs["processed"], "16m")  # its own file system: moves are copy + fsync + rename
    images = distinct_images(20, seed=32)
    shas = write_images(dirs["inbox"], images[:3], prefix="before")
    a = AgentProc("run", site_args(dirs, bundle_dir, "--quiet-seconds", "0.2", "--queue-max", "4", "--min-free-mb", "1",
                                   "--log-level", "INFO"), tmp_path / "agent.log", registry=procs)
    wait_for(lambda: outcome_count(dirs["db"]) == 3 and not inbox_files(dirs["inbox"]), what="the first files",
             proc=a)
    r = _mount("-o", "remount,ro", str(processed))
    assert r.returncode == 0, r.stderr
    later = write_images(dirs["inbox"], images[3:], prefix="later")
    shas |= later
    wait_for(lambda: "intake paused until it is writable again" in a.log(), what="the agent to notice", proc=a)
    wait_for(lambda: "paused" in status(dirs["db"]).stderr, what="status to report the pause", proc=a)
    st = status(dirs["db"])
    assert st.returncode == 1 and "read-only file system" in st.stderr, st.stderr
    time.sleep(1.0)
    rows = outcome_rows(dirs["db"])
    assert len(rows) <= 3 + 2 * 4, "it kept taking files after the first failed move (queue_max 4)"
    assert {p.name for p in inbox_files(dirs["inbox"])} == set(later), "every later file is still in the inbox"
    assert all(r["file_state"] == "pending" for r in rows if r["original_name"] in later)

    r = _mount("-o", "remount,rw", str(processed))
    assert r.returncode == 0, r.stderr
    wait_for(lambda: not inbox_files(dirs["inbox"]) and outcome_count(dirs["db"]) == 20
             and all(r["file_state"] == "moved" for r in outcome_rows(dirs["db"])), what="the agent to resume",
             proc=a)
    a.term()
    assert a.wait(60) == 0, a.log()[-3000:]
    assert "writable again; resuming" in a.log()
    assert_exactly_once(dirs, shas)


def test_injected_enospc_and_database_full_pause_and_resume(dirs, bundle_dir, monkeypatch) -> None:
    """No root needed: the move raises ENOSPC and SQLite reports a full disk, in-process, while flags are set."""
    import edge_agent.commit as commit
    from conftest import settings_for
    from edge_agent.pipeline import Agent
    from edge_agent.store import Writer

    move_full, db_full = threading.Event(), threading.Event()
    real_move, real_begin = commit.move_file, Writer._begin

    def move(src, dest, private=False, **kw):
        if move_full.is_set():
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(dest))
        return real_move(src, dest, private, **kw)

    def begin(self, lock_wait):
        if db_full.is_set():
            raise sqlite3.OperationalError("database or disk is full")
        return real_begin(self, lock_wait)

    monkeypatch.setattr(commit, "move_file", move)
    monkeypatch.setattr(Writer, "_begin", begin)
    monkeypatch.setattr(commit, "PROBE_SECONDS", 0.2)
    probe_full = {"on": False}
    real_probe = commit.Committer._probe_outputs

    def probe(self):
        if probe_full["on"]:
            self._next_probe = time.monotonic() + 0.2
            return
        return real_probe(self)

    monkeypatch.setattr(commit.Committer, "_probe_outputs", probe)
    agent = Agent(settings_for(dirs, bundle_dir, queue_max=2, rescan_seconds=0.5))
    stop = threading.Event()
    out: dict = {}
    t = threading.Thread(target=lambda: out.setdefault("code", agent.run(stop)), daemon=True)
    t.start()
    try:
        wait_for(agent.ready.is_set, what="the agent")
        images = distinct_images(12, seed=33)
        move_full.set()
        probe_full["on"] = True
        shas = write_images(dirs["inbox"], images[:6], prefix="nospace")
        wait_for(lambda: agent.db_error and "No space left" in agent.db_error, what="the pause")
        time.sleep(0.5)
        assert len(inbox_files(dirs["inbox"])) == 6, "a file left the inbox while nothing could be moved"
        assert outcome_count(dirs["db"]) <= 2 * 2
        probe_full["on"] = False
        move_full.clear()
        wait_for(lambda: not inbox_files(dirs["inbox"]) and outcome_count(dirs["db"]) == 6, what="the resume")

        db_full.set()
        shas |= write_images(dirs["inbox"], images[6:], prefix="dbfull")
        wait_for(lambda: agent.db_error and "is full" in agent.db_error, what="the database pause")
        time.sleep(0.5)
        assert len(inbox_files(dirs["inbox"])) == 6 and outcome_count(dirs["db"]) == 6
        db_full.clear()
        wait_for(lambda: not inbox_files(dirs["inbox"]) and outcome_count(dirs["db"]) == 12, what="the resume")
    finally:
        db_full.clear()
        move_full.clear()
        probe_full["on"] = False
        stop.set()
        t.join(60)
    assert out.get("code") == 0
    assert_exactly_once(dirs, shas)
