"""Backups (issue 14, item 3): `edge-agent backup --to FILE` on a real database, while a real daemon writes,
restore (restore, restart, nothing screened twice), and the systemd service + timer shipped for it."""
from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import EXAMPLES, rows, run_agent, variant_jpegs
from faults import AgentProc, site_args, wait_for

from edge_agent.backup import backup, check_backup

SD = Path(__file__).resolve().parents[1] / "systemd"
ANALYZE = shutil.which("systemd-analyze")


def shas(db: Path, table: str = "results") -> set[str]:
    return {r[0] for r in rows(db, f"SELECT sha256 FROM {table}")}


def scan(dirs: dict[str, Path], bundle: Path) -> None:
    r = run_agent("scan", *site_args(dirs, bundle, "--quiet-seconds", "0"))
    assert r.returncode == 0, r.stdout + r.stderr


def test_backup_cli_copies_checks_and_is_a_plain_file(tmp_path: Path, dirs: dict[str, Path], bundle_dir: Path) -> None:
    variant_jpegs(sorted(EXAMPLES.glob("*.jpg")), dirs["inbox"], 5)
    scan(dirs, bundle_dir)
    out = tmp_path / "b" / "copy.db"
    out.parent.mkdir()
    r = run_agent("backup", "--db", str(dirs["db"]), "--to", str(out))
    assert r.returncode == 0, r.stderr
    assert "integrity_check ok" in r.stdout and "5 results" in r.stdout
    assert shas(out) == shas(dirs["db"])
    assert rows(out, "PRAGMA journal_mode")[0][0] == "delete"  # self-contained: no -wal to forget
    assert oct(out.stat().st_mode & 0o777) == "0o600"
    assert not [p for p in out.parent.iterdir() if p.name != "copy.db"]  # no temporary left behind
    assert check_backup(out) == 5


def test_backup_to_folder_keeps_the_newest(tmp_path: Path, dirs: dict[str, Path], bundle_dir: Path) -> None:
    variant_jpegs(sorted(EXAMPLES.glob("*.jpg")), dirs["inbox"], 2)
    scan(dirs, bundle_dir)
    folder = tmp_path / "backups"
    folder.mkdir()
    (folder / "unrelated.txt").write_text("not ours")
    made = []
    for _ in range(3):
        made.append(backup(dirs["db"], folder, keep=2).path)
        time.sleep(1.1)  # distinct time-stamped names (second resolution), not a timing assertion
    left = sorted(p.name for p in folder.iterdir())
    assert left == sorted([made[1].name, made[2].name, "unrelated.txt"])


@pytest.mark.parametrize("case", ["same-file", "wal-file", "no-folder", "foreign-db", "no-db"])
def test_backup_refuses_bad_targets_and_sources(tmp_path: Path, dirs: dict[str, Path], bundle_dir: Path,
                                               case: str) -> None:
    variant_jpegs(sorted(EXAMPLES.glob("*.jpg")), dirs["inbox"], 1)
    scan(dirs, bundle_dir)
    db, to = dirs["db"], tmp_path / "copy.db"
    if case == "same-file":
        to = db
    elif case == "wal-file":
        to = Path(f"{db}-wal")
    elif case == "no-folder":
        to = tmp_path / "nope" / "copy.db"
    elif case == "foreign-db":
        db = tmp_path / "other.db"
        c = sqlite3.connect(db)
        c.execute("CREATE TABLE t (x)")
        c.commit()
        c.close()
    elif case == "no-db":
        db = tmp_path / "missing.db"
    before = dirs["db"].read_bytes()
    r = run_agent("backup", "--db", str(db), "--to", str(to))
    assert r.returncode in (2, 3), r.stdout + r.stderr
    want = {"same-file": "is the database itself", "wal-file": "is the database itself", "no-folder": "does not exist",
            "foreign-db": "not an edge-agent results database", "no-db": "no database"}[case]
    assert want in r.stderr, r.stderr
    assert dirs["db"].read_bytes() == before
    assert not to.exists() or case in ("same-file", "wal-file")


def test_backup_while_the_daemon_writes_and_restore_screens_nothing_twice(
        tmp_path: Path, dirs: dict[str, Path], bundle_dir: Path, procs: list) -> None:
    sources = variant_jpegs(sorted(EXAMPLES.glob("*.jpg")), tmp_path / "src", 120)
    agent = AgentProc("run", site_args(dirs, bundle_dir, "--quiet-seconds", "0", "--rescan-seconds", "1"),
                      tmp_path / "agent.log", registry=procs)
    wait_for(lambda: "watching" in agent.log(), what="agent ready", proc=agent)
    stop = threading.Event()
    fed: list[Path] = []

    def feed() -> None:
        for src in sources:
            if stop.is_set():
                return
            tmp = dirs["inbox"] / f".{src.name}.part"
            shutil.copyfile(src, tmp)
            os.rename(tmp, dirs["inbox"] / src.name)
            fed.append(src)
            time.sleep(0.03)

    t = threading.Thread(target=feed, daemon=True)
    t.start()
    backups = []
    try:
        for i in range(4):  # while files arrive and the writer commits
            wait_for(lambda i=i: len(fed) >= 20 * (i + 1), what="more files fed", proc=agent)
            r = run_agent("backup", "--db", str(dirs["db"]), "--to", str(tmp_path / f"b{i}.db"))
            assert r.returncode == 0, r.stderr
            backups.append(tmp_path / f"b{i}.db")
    finally:
        stop.set()
        t.join()
    wait_for(lambda: rows(dirs["db"], "SELECT count(*) FROM results")[0][0] == len(fed), timeout=120,
             what="every file screened", proc=agent)
    agent.term()
    assert agent.wait(60) == 0
    final = shas(dirs["db"])
    counts = []
    for b in backups:
        assert check_backup(b) >= 0  # integrity_check ok
        got = shas(b)
        assert got <= final  # a consistent snapshot: only rows the live database has too
        counts.append(len(got))
    assert counts == sorted(counts) and counts[-1] > 0

    # restore the second backup: stop (done), move the database and its side files aside, copy, restart
    restore = backups[1]
    for suffix in ("", "-wal", "-shm"):
        p = Path(f"{dirs['db']}{suffix}")
        if p.exists():
            p.rename(tmp_path / f"broken{suffix or '.db'}")
    shutil.copyfile(restore, dirs["db"])
    before_restart = shas(dirs["db"])
    # restart; then one image from before the backup and one from after it are sent again
    in_backup = next(s for s in sources if _sha(s) in before_restart)
    after_backup = next(s for s in sources[: len(fed)] if _sha(s) not in before_restart)
    shutil.copyfile(in_backup, dirs["inbox"] / "again_old.jpg")
    shutil.copyfile(after_backup, dirs["inbox"] / "again_new.jpg")
    scan(dirs, bundle_dir)
    got = rows(dirs["db"], "SELECT sha256, count(*) FROM results GROUP BY sha256 HAVING count(*) > 1")
    assert not got  # nothing screened twice
    assert rows(dirs["db"], "SELECT count(*) FROM duplicates WHERE original_name = 'again_old.jpg'")[0][0] == 1
    assert rows(dirs["db"], "SELECT count(*) FROM results WHERE original_name = 'again_new.jpg'")[0][0] == 1
    # the processed files of images screened after the backup are not taken again (they left the inbox)
    assert len(shas(dirs["db"])) == len(before_restart) + 1
    assert not list(dirs["inbox"].iterdir())


def _sha(p: Path) -> str:
    import hashlib

    return hashlib.sha256(p.read_bytes()).hexdigest()


def test_backup_api_raises_with_the_reason(tmp_path: Path) -> None:
    from edge_agent.store import StoreError

    with pytest.raises(StoreError, match="no database"):
        backup(tmp_path / "missing.db", tmp_path / "x.db")


# --- the systemd service and timer --------------------------------------------------------------

def test_backup_units_are_shipped_and_consistent() -> None:
    svc = (SD / "edge-agent-backup.service").read_text()
    timer = (SD / "edge-agent-backup.timer").read_text()
    assert "Type=oneshot" in svc and "edge-agent backup --config /etc/edge-agent/config.toml --to" in svc
    assert "Persistent=true" in timer and "OnCalendar=" in timer and "WantedBy=timers.target" in timer
    tmpfiles = (SD / "edge-agent.tmpfiles").read_text()
    assert "/var/lib/edge-agent/backups" in tmpfiles


@pytest.mark.skipif(ANALYZE is None, reason="systemd-analyze not installed (apt-get install systemd)")
def test_backup_units_verify_and_score(tmp_path: Path) -> None:
    d = tmp_path / "units"
    d.mkdir()
    svc = (SD / "edge-agent-backup.service").read_text().replace(
        "ExecStart=/opt/edge-agent/venv/bin/edge-agent ", f"ExecStart={sys.executable} ")
    (d / "edge-agent-backup.service").write_text(svc)
    shutil.copy(SD / "edge-agent-backup.timer", d)
    env = {**os.environ, "SYSTEMD_COLORS": "0", "SYSTEMD_LOG_COLOR": "0"}
    r = subprocess.run([ANALYZE, "verify", "--man=no", str(d / "edge-agent-backup.service"),
                        str(d / "edge-agent-backup.timer")], capture_output=True, text=True, env=env)
    ours = [ln for ln in (r.stdout + r.stderr).splitlines() if "edge-agent" in ln]
    assert r.returncode == 0 and not ours, r.stdout + r.stderr
    r = subprocess.run([ANALYZE, "security", "--offline=true", "--no-pager", str(d / "edge-agent-backup.service")],
                       capture_output=True, text=True, env=env)
    import re

    m = re.search(r"Overall exposure level for edge-agent-backup\.service:\s*([0-9.]+)", r.stdout + r.stderr)
    assert m and float(m.group(1)) <= 2.0, r.stdout + r.stderr
