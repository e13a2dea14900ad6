"""The SQLite store: schema, migrations, permissions, idempotent recovery bookkeeping."""
from __future__ import annotations

import os
import shutil
import sqlite3
import stat
from pathlib import Path

import pytest

from conftest import rows, scan_now
from edge_agent.store import SCHEMA_VERSION, StoreError, Writer, connect

LABELS = ("akiec", "bcc", "bkl", "df", "mel", "nv", "vasc")


def test_new_database_schema_and_permissions(tmp_path: Path) -> None:
    db = tmp_path / "new" / "results.db"
    w = Writer(db, LABELS)
    w.close()
    assert stat.S_IMODE(os.stat(db).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(db.parent).st_mode) == 0o700
    tables = {r[0] for r in rows(db, "SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert {"results", "duplicates", "quarantine", "events", "agent_state", "schema_version"} <= tables
    cols = {r[1] for r in rows(db, "PRAGMA table_info(results)")}
    assert {f"p_{x}" for x in LABELS} <= cols and {"sha256", "needs_review", "review_reasons", "model_variant"} <= cols
    assert rows(db, "PRAGMA user_version")[0][0] == SCHEMA_VERSION
    assert [r["version"] for r in rows(db, "SELECT version FROM schema_version")] == list(range(1, SCHEMA_VERSION + 1))
    idx = rows(db, "SELECT sql FROM sqlite_master WHERE type = 'index' AND tbl_name = 'results'")
    assert any("UNIQUE" in (r[0] or "") and "sha256" in r[0] for r in idx)


def test_migration_is_idempotent_and_adds_new_label_columns(tmp_path: Path) -> None:
    db = tmp_path / "r.db"
    Writer(db, LABELS).close()
    Writer(db, LABELS).close()
    Writer(db, (*LABELS, "scc")).close()
    cols = [r[1] for r in rows(db, "PRAGMA table_info(results)")]
    assert cols.count("p_mel") == 1 and "p_scc" in cols
    assert len(rows(db, "SELECT * FROM schema_version")) == SCHEMA_VERSION


def test_newer_schema_is_refused_untouched(tmp_path: Path) -> None:
    db = tmp_path / "r.db"
    Writer(db, LABELS).close()
    conn = sqlite3.connect(db)
    conn.execute("PRAGMA user_version = 99")
    conn.close()
    with pytest.raises(StoreError, match="newer than this agent"):
        Writer(db, LABELS)
    assert rows(db, "PRAGMA user_version")[0][0] == 99


def test_not_a_database(tmp_path: Path) -> None:
    db = tmp_path / "r.db"
    db.write_text("hello, not sqlite" * 100)
    with pytest.raises(StoreError, match="not a usable SQLite database"):
        Writer(db, LABELS)


def test_duplicate_sha_insert_is_ignored_not_an_error(tmp_path: Path) -> None:
    w = Writer(tmp_path / "r.db", LABELS)
    row = {"sha256": "ab" * 32, "original_name": "a.jpg", "original_path": "/in/a.jpg", "file_state": "pending",
           "received_at": "t", "processed_at": "t", "model_id": "m", "model_variant": "int8", "fallback": 0,
           "label": "nv", "confidence": 0.9, "probabilities": {x: 1 / 7 for x in LABELS}, "needs_review": 0,
           "review_reasons": ""}
    with w.transaction():
        assert w.insert_result(row) == 1
        assert w.insert_result({**row, "original_path": "/in/b.jpg"}) is None
    assert w.result_id("ab" * 32) == 1
    w.close()


def test_restart_after_crash_before_move_finishes_the_move(dirs: dict[str, Path], bundle_dir: Path,
                                                           example_images: list[Path]) -> None:
    """Simulate the state a crash between commit and move leaves: committed rows, files still in the inbox."""
    for p in example_images[:3]:
        shutil.copy(p, dirs["inbox"])
    assert scan_now(dirs, bundle_dir, after="keep")[0] == 0
    conn = connect(dirs["db"])
    conn.execute("UPDATE results SET file_state = 'pending', stored_path = NULL")
    conn.commit()
    conn.close()
    assert scan_now(dirs, bundle_dir)[0] == 0
    res = rows(dirs["db"], "SELECT file_state, stored_path FROM results")
    assert len(res) == 3 and all(r["file_state"] == "moved" and Path(r["stored_path"]).exists() for r in res)
    assert rows(dirs["db"], "SELECT count(*) FROM duplicates")[0][0] == 0
    assert list(dirs["inbox"].iterdir()) == []


def test_restart_after_crash_after_move_fixes_bookkeeping(dirs: dict[str, Path], bundle_dir: Path,
                                                          example_images: list[Path]) -> None:
    shutil.copy(example_images[0], dirs["inbox"])
    assert scan_now(dirs, bundle_dir)[0] == 0
    conn = connect(dirs["db"])
    conn.execute("UPDATE results SET file_state = 'pending'")  # the move happened, its bookkeeping did not
    conn.commit()
    conn.close()
    assert scan_now(dirs, bundle_dir)[0] == 0
    assert rows(dirs["db"], "SELECT file_state FROM results")[0][0] == "moved"
