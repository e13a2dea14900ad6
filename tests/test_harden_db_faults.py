"""Issue 16 items 6, 7 and 9: the database deleted, damaged, read-only or foreign.

Deleted while `run` works: the agent used to go on committing into the
deleted file and moving images out of the inbox with no record left. Damaged
pages: every later image was quarantined as `internal_error` and the restart
ended in a traceback. Read-only: `scan` retried for minutes. A foreign SQLite
file with user_version=1: a traceback. Now: the database's faults stop intake
with the cause, never quarantine an image, and a start on such a database
exits 2 with a message.
"""
from __future__ import annotations

import hashlib
import os
import sqlite3
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from faults import (AgentProc, agent_env, distinct_images, give_to_nobody, inbox_files, outcome_count, site_args,
                    unprivileged_prefix, wait_for, write_images)


def cli(*args: str, prefix: list[str] = ()) -> subprocess.CompletedProcess:
    return subprocess.run([*prefix, sys.executable, "-m", "edge_agent", *args], env=agent_env(), capture_output=True,
                          text=True, timeout=120, cwd="/")


def start(procs, dirs, bundle, tmp_path, name: str = "agent.log") -> AgentProc:
    return AgentProc("run", site_args(dirs, bundle, "--quiet-seconds", "0.2", "--log-level", "INFO"),
                     tmp_path / name, registry=procs)


def first_scan(dirs: dict[str, Path], bundle: Path, n: int, seed: int) -> None:
    write_images(dirs["inbox"], distinct_images(n, seed=seed), prefix="first")
    r = cli("scan", *site_args(dirs, bundle))
    assert r.returncode == 0, r.stderr
    assert outcome_count(dirs["db"]) == n


def corrupt_index(db: Path, index: str = "idx_results_sha256") -> None:
    """Overwrite the root page of one index with garbage (the table's own pages stay intact)."""
    conn = sqlite3.connect(db)
    try:
        page_size = conn.execute("PRAGMA page_size").fetchone()[0]
        root = conn.execute("SELECT rootpage FROM sqlite_master WHERE name = ?", (index,)).fetchone()[0]
    finally:
        conn.close()
    with open(db, "r+b") as f:
        f.seek((root - 1) * page_size)
        f.write(b"\xa5" * page_size)


def test_database_deleted_while_running_stops_intake_and_moves_nothing(procs, dirs, bundle_dir, tmp_path) -> None:
    a = start(procs, dirs, bundle_dir, tmp_path)
    write_images(dirs["inbox"], distinct_images(3, seed=191), prefix="before")
    wait_for(lambda: outcome_count(dirs["db"]) == 3, what="the first files", proc=a)
    for suffix in ("", "-wal", "-shm"):
        Path(str(dirs["db"]) + suffix).unlink(missing_ok=True)
    after = write_images(dirs["inbox"], distinct_images(8, seed=192)[3:], prefix="after")
    assert a.wait(120) == 3, a.log()[-3000:]
    log = a.log()
    assert "was deleted (or moved away, or its disk is gone) while the agent was using it" in log
    assert "Traceback" not in log
    assert sorted(p.name for p in inbox_files(dirs["inbox"])) == sorted(after), "images left with no record"


def test_damaged_database_stops_intake_without_quarantining_images(procs, dirs, bundle_dir, tmp_path) -> None:
    first_scan(dirs, bundle_dir, 3, seed=193)
    a = start(procs, dirs, bundle_dir, tmp_path)
    wait_for(lambda: "watching" in a.log(), what="the agent to start", proc=a)
    corrupt_index(dirs["db"])  # damaged under the running agent (its connections have not read that page)
    new = write_images(dirs["inbox"], distinct_images(8, seed=194)[3:], prefix="new")
    assert a.wait(120) == 3, a.log()[-3000:]
    log = a.log()
    assert "is damaged" in log and "internal_error" not in log and "quarantined" not in log, log[-3000:]
    assert sorted(p.name for p in inbox_files(dirs["inbox"])) == sorted(new)
    assert not dirs["quarantine"].exists() or not any(dirs["quarantine"].rglob("*.jpg"))

    # Restart on the damaged database: exit 2 with the cause and what to do, not a traceback.
    for cmd in ("run", "scan"):
        r = cli(cmd, *site_args(dirs, bundle_dir))
        assert r.returncode == 2, (cmd, r.stderr)
        assert "is damaged" in r.stderr and "restore it from a backup" in r.stderr and "Traceback" not in r.stderr
    assert sorted(p.name for p in inbox_files(dirs["inbox"])) == sorted(new)
    r = cli("results", "--db", str(dirs["db"]))  # reads through the damaged index's table: a message, no traceback
    assert r.returncode in (0, 2) and "Traceback" not in r.stderr, r.stderr


def test_foreign_sqlite_file_is_refused_and_left_untouched(dirs, bundle_dir, tmp_path) -> None:
    write_images(dirs["inbox"], distinct_images(1, seed=195))
    dirs["db"].parent.mkdir(parents=True)
    conn = sqlite3.connect(dirs["db"])
    conn.executescript("CREATE TABLE results (id INTEGER PRIMARY KEY, what TEXT); INSERT INTO results (what) "
                       "VALUES ('not ours'); PRAGMA user_version = 1;")
    conn.close()
    before = hashlib.sha256(dirs["db"].read_bytes()).hexdigest()
    for cmd in ("scan", "run"):
        r = cli(cmd, *site_args(dirs, bundle_dir))
        assert r.returncode == 2, (cmd, r.stderr)
        assert "is not an edge-agent results database" in r.stderr and "Traceback" not in r.stderr, r.stderr
    for cmd in ("status", "results"):
        r = cli(cmd, "--db", str(dirs["db"]))
        assert r.returncode == 2 and "not an edge-agent results database" in r.stderr, (cmd, r.stderr)
    assert hashlib.sha256(dirs["db"].read_bytes()).hexdigest() == before
    # another program's database, recognised by its application_id
    other = tmp_path / "other.db"
    conn = sqlite3.connect(other)
    conn.executescript("PRAGMA application_id = 1234; CREATE TABLE t (x);")
    conn.close()
    r = cli("scan", *site_args({**dirs, "db": other}, bundle_dir))
    assert r.returncode == 2 and "another program" in r.stderr, r.stderr


def test_scan_on_a_read_only_database_fails_fast_with_the_cause(bundle_dir) -> None:
    prefix = unprivileged_prefix()
    if prefix is None:
        pytest.skip("needs an unprivileged user to make a read-only database (root ignores modes)")
    work = Path(tempfile.mkdtemp(prefix="edge-ro-db-", dir="/tmp"))
    os.chmod(work, 0o755)  # the unprivileged agent must reach the site (pytest's folders are root-only)
    try:
        root = work / "site"
        dirs = {"root": root, "inbox": root / "inbox", "db": root / "db" / "results.db",
                "processed": root / "processed", "quarantine": root / "quarantine"}
        dirs["inbox"].mkdir(parents=True)
        bundle = shutil.copytree(bundle_dir, root / "bundle")
        first_scan(dirs, bundle, 1, seed=196)
        shas = write_images(dirs["inbox"], distinct_images(3, seed=197)[1:], prefix="more")
        give_to_nobody(root)
        os.chmod(dirs["db"], 0o400)
        r = cli("scan", *site_args(dirs, bundle), prefix=prefix)
        assert r.returncode == 2, (r.returncode, r.stderr)
        assert "cannot be written" in r.stderr and "make the file and its folder writable" in r.stderr, r.stderr
        assert "Traceback" not in r.stderr
        assert sorted(p.name for p in inbox_files(dirs["inbox"])) == sorted(shas)
        # the same for the daemon: it refuses to start rather than run half-working
        r = cli("run", *site_args(dirs, bundle), prefix=prefix)
        assert r.returncode == 2 and "cannot be written" in r.stderr, r.stderr
    finally:
        shutil.rmtree(work, ignore_errors=True)


def test_status_and_results_on_a_missing_database_say_so(tmp_path) -> None:
    for cmd in ("status", "results"):
        r = cli(cmd, "--db", str(tmp_path / "none.db"))
        assert r.returncode == 2 and "no database at" in r.stderr and "Traceback" not in r.stderr, r.stderr
