"""Retention (issue 14, item 2): `edge-agent prune [--dry-run]` and the daemon's pruning on real folders and a
real database. Only files a row says the agent stored, inside processed/quarantine, reached without symlinks,
with the row's content; rows stay (file_state 'pruned' + pruned_at); the inbox is never touched. Plus the
schema migration from a version-2 database."""
from __future__ import annotations

import json
import os
import sqlite3
from pathlib import Path

import pytest
from conftest import EXAMPLES, rows, run_agent, variant_jpegs
from faults import AgentProc, site_args, wait_for

OLD = "2020-01-01T00:00:00.000Z"


def setup_site(dirs: dict[str, Path], bundle: Path, n: int = 6) -> None:
    variant_jpegs(sorted(EXAMPLES.glob("*.jpg")), dirs["inbox"], n)
    (dirs["inbox"] / "junk.jpg").write_bytes(b"this is not an image at all" * 10)  # -> quarantine
    (dirs["inbox"] / "dup.jpg").write_bytes((dirs["inbox"] / "img_000.jpg").read_bytes())  # -> duplicate
    r = run_agent("scan", *site_args(dirs, bundle, "--quiet-seconds", "0", "--partial-timeout-seconds", "0.01"))
    assert r.returncode == 0, r.stdout + r.stderr
    assert rows(dirs["db"], "SELECT count(*) FROM quarantine")[0][0] == 1
    assert rows(dirs["db"], "SELECT count(*) FROM duplicates")[0][0] == 1


def age(db: Path, table: str, col: str, where: str = "1") -> None:
    c = sqlite3.connect(db)
    c.execute(f"UPDATE {table} SET {col} = ? WHERE {where}", (OLD,))
    c.commit()
    c.close()


def stored(db: Path, table: str) -> list[Path]:
    return [Path(r[0]) for r in rows(db, f"SELECT stored_path FROM {table} WHERE file_state = 'moved' ORDER BY id")]


def count(db: Path, sql: str) -> int:
    try:
        return rows(db, sql)[0][0]
    except sqlite3.OperationalError:  # not created yet
        return 0


def prune(dirs: dict[str, Path], *args: str):
    return run_agent("prune", "--db", str(dirs["db"]), "--inbox", str(dirs["inbox"]), *args)


def test_dry_run_lists_and_removes_nothing_then_prune_removes_old_only(dirs: dict[str, Path], bundle_dir: Path) -> None:
    setup_site(dirs, bundle_dir)
    files = stored(dirs["db"], "results")
    age(dirs["db"], "results", "processed_at", "id <= 3")
    age(dirs["db"], "duplicates", "recorded_at")
    counts = {t: rows(dirs["db"], f"SELECT count(*) FROM {t}")[0][0] for t in ("results", "duplicates", "quarantine")}
    inbox_marker = dirs["inbox"] / "new_arrival.jpg"
    inbox_marker.write_bytes(b"x")

    r = prune(dirs, "--keep-processed-days", "30", "--dry-run")
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("would remove") == 4 and "dry run: 4 file(s)" in r.stdout
    assert all(p.exists() for p in files)

    r = prune(dirs, "--keep-processed-days", "30", "--format", "json")
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout)
    assert rep["removed"] == 4 and rep["by_table"] == {"results": 3, "duplicates": 1} and not rep["skipped"]
    assert [p.exists() for p in files] == [False, False, False, True, True, True]
    # rows stay, marked pruned with a time; the quarantined file (no keep_quarantine_days) stays
    assert counts == {t: rows(dirs["db"], f"SELECT count(*) FROM {t}")[0][0] for t in counts}
    pr = rows(dirs["db"], "SELECT id, file_state, pruned_at, stored_path FROM results ORDER BY id")
    assert [r["file_state"] for r in pr] == ["pruned"] * 3 + ["moved"] * 3
    assert all(r["pruned_at"] for r in pr[:3]) and not any(r["pruned_at"] for r in pr[3:])
    assert all(r["stored_path"] for r in pr)  # where it was stays on record
    assert all(p.exists() for p in stored(dirs["db"], "quarantine"))
    assert inbox_marker.exists()
    r = run_agent("results", "--db", str(dirs["db"]), "--format", "csv")
    assert "removed by retention" in r.stdout
    # a second run has nothing left to do
    assert json.loads(prune(dirs, "--keep-processed-days", "30", "--format", "json").stdout)["removed"] == 0


def test_quarantine_retention_and_empty_day_folders(dirs: dict[str, Path], bundle_dir: Path) -> None:
    setup_site(dirs, bundle_dir, 2)
    q = stored(dirs["db"], "quarantine")[0]
    age(dirs["db"], "quarantine", "quarantined_at")
    r = prune(dirs, "--keep-quarantine-days", "7")
    assert r.returncode == 0 and "removed 1 file(s)" in r.stdout, r.stdout + r.stderr
    assert not q.exists() and not q.parent.exists()  # its day folder was emptied and removed
    assert dirs["quarantine"].is_dir()  # never the folder itself
    assert all(p.exists() for p in stored(dirs["db"], "results"))


@pytest.mark.parametrize("case", ["outside", "symlink-file", "content-changed", "symlink-dir", "missing",
                                  "unrecorded", "kept-in-inbox"])
def test_prune_never_removes_what_the_database_does_not_describe(tmp_path: Path, dirs: dict[str, Path],
                                                                 bundle_dir: Path, case: str) -> None:
    setup_site(dirs, bundle_dir, 2)
    age(dirs["db"], "results", "processed_at")
    target = stored(dirs["db"], "results")[0]
    victim = tmp_path / "precious.jpg"
    victim.write_bytes(b"someone else's file")
    c = sqlite3.connect(dirs["db"])
    if case == "outside":  # a row (edited, or from another layout) pointing out of the processed folder
        c.execute("UPDATE results SET stored_path = ? WHERE id = 1", (str(victim),))
    elif case == "symlink-file":
        target.unlink()
        target.symlink_to(victim)
    elif case == "content-changed":
        target.write_bytes(b"other content under the recorded name")
    elif case == "symlink-dir":
        day = target.parent
        moved = tmp_path / "elsewhere"
        day.rename(moved)
        day.symlink_to(moved)
    elif case == "missing":
        target.unlink()
    elif case == "unrecorded":
        (target.parent / "not_in_db.jpg").write_bytes(b"a file nobody recorded")
    elif case == "kept-in-inbox":  # after = keep: the row's file is the inbox file
        c.execute("UPDATE results SET file_state = 'kept', stored_path = NULL, original_path = ? WHERE id = 1",
                  (str(dirs["inbox"] / "kept.jpg"),))
        (dirs["inbox"] / "kept.jpg").write_bytes(b"kept in the inbox")
    c.commit()
    c.close()
    r = prune(dirs, "--keep-processed-days", "1", "--format", "json")
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout)
    first = rows(dirs["db"], "SELECT file_state FROM results WHERE id = 1")[0][0]
    assert victim.read_bytes() == b"someone else's file"
    if case in ("outside", "symlink-file", "content-changed", "symlink-dir"):
        # (a symlinked day folder: both images screened that day are left alone)
        assert len(rep["skipped"]) == (2 if case == "symlink-dir" else 1) and first == "moved", rep
        why = rep["skipped"][0]["why"]
        assert {"outside": "not inside", "symlink-file": "not a regular file", "content-changed": "sha256 differs",
                "symlink-dir": "symlink"}[case] in why, why
        if case == "content-changed":
            assert target.read_bytes() == b"other content under the recorded name"
        if case == "symlink-dir":
            assert (tmp_path / "elsewhere" / target.name).exists()
    elif case == "missing":
        assert rep["missing"] == 1 and first == "missing"
    elif case == "unrecorded":
        assert (target.parent / "not_in_db.jpg").exists() and rep["removed"] == 2
    elif case == "kept-in-inbox":
        assert (dirs["inbox"] / "kept.jpg").exists() and first == "kept" and rep["removed"] == 1


def test_watermark_removes_oldest_screened_images_but_not_quarantine(dirs: dict[str, Path], bundle_dir: Path) -> None:
    setup_site(dirs, bundle_dir, 3)
    # a watermark above any real disk's free space: everything screened goes, oldest first; quarantine stays
    r = prune(dirs, "--prune-free-mb", "1e11", "--format", "json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["by_table"] == {"results": 3, "duplicates": 1}
    assert all(p.exists() for p in stored(dirs["db"], "quarantine"))
    assert rows(dirs["db"], "SELECT count(*) FROM results WHERE file_state = 'pruned'")[0][0] == 3


def test_prune_without_retention_settings_says_what_to_set(dirs: dict[str, Path], bundle_dir: Path) -> None:
    setup_site(dirs, bundle_dir, 1)
    r = prune(dirs)
    assert r.returncode == 1 and "keep_processed_days" in r.stderr and "nothing was removed" in r.stderr


def test_daemon_prunes_on_its_own_and_records_it(tmp_path: Path, dirs: dict[str, Path], bundle_dir: Path,
                                                 procs: list) -> None:
    variant_jpegs(sorted(EXAMPLES.glob("*.jpg")), dirs["inbox"], 4)
    a = AgentProc("run", site_args(dirs, bundle_dir, "--quiet-seconds", "0", "--keep-processed-days", "0.00001",
                                   "--prune-seconds", "1"), tmp_path / "a.log", registry=procs)
    wait_for(lambda: count(dirs["db"], "SELECT count(*) FROM results WHERE file_state = 'pruned'") == 4,
             timeout=60, what="the daemon prunes", proc=a)
    wait_for(lambda: rows(dirs["db"], "SELECT count(*) FROM events WHERE kind = 'pruned'")[0][0] >= 1,
             what="a pruned event", proc=a)
    a.term()
    assert a.wait(60) == 0
    assert not [p for p in dirs["processed"].rglob("*") if p.is_file()]
    assert rows(dirs["db"], "SELECT count(*) FROM results")[0][0] == 4


def test_migration_from_a_version_2_database(tmp_path: Path, dirs: dict[str, Path], bundle_dir: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    from edge_agent import store

    db = tmp_path / "v2.db"
    with monkeypatch.context() as m:  # a database exactly as the version-2 agent made it
        m.setattr(store, "SCHEMA_VERSION", 2)
        m.setattr(store, "MIGRATIONS", store.MIGRATIONS[:2])
        w = store.Writer(db, ["mel", "nv"])
        with w.transaction():
            w.conn.execute("INSERT INTO quarantine (original_name, original_path, stored_path, file_state, "
                           "received_at, reason_code, reason, quarantined_at) VALUES ('a', '/x/a', '/q/a', 'moved', "
                           "?, 'not_image', 'r', ?)", (OLD, OLD))
        w.close()
    assert rows(db, "PRAGMA user_version")[0][0] == 2
    assert "pruned_at" not in {r[1] for r in rows(db, "PRAGMA table_info(quarantine)")}
    w = store.Writer(db, ["mel", "nv"])  # the current agent opens it
    w.close()
    assert rows(db, "PRAGMA user_version")[0][0] == store.SCHEMA_VERSION >= 3
    for t in ("results", "duplicates", "quarantine"):
        assert "pruned_at" in {r[1] for r in rows(db, f"PRAGMA table_info({t})")}
    assert rows(db, "SELECT original_name, file_state FROM quarantine")[0][:] == ("a", "moved")
    # idempotent: an interrupted migration simply reruns
    import sqlite_utils

    c = sqlite3.connect(db)
    store._migration_retention(sqlite_utils.Database(c))
    c.close()
    assert os.path.exists(db)
