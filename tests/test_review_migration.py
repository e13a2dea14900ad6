"""The reviews migration: older databases gain `reviews` (append-only), its views and the worklist index, and
keep every row."""
from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from conftest import rows, scan_now
from edge_agent.store import SCHEMA_VERSION, connect, migrate


LATER_COLUMNS = {  # columns that migrations after `version` add, per table
    2: {"results": ("manifest_sha256", "policy")},
    3: {"results": ("ood_score",)},
    4: {"results": ("pruned_at",), "duplicates": ("pruned_at",), "quarantine": ("pruned_at",)},
}


def _downgrade_to(db: Path, version: int) -> None:
    """Make a real agent database look like one written by the agent of schema `version`: drop what later
    migrations added (reviews and its views/index, and the later columns)."""
    conn = sqlite3.connect(db)
    conn.executescript("DROP VIEW IF EXISTS results_reviewed; DROP VIEW IF EXISTS latest_reviews; "
                       "DROP TRIGGER IF EXISTS reviews_no_update; DROP TRIGGER IF EXISTS reviews_no_delete; "
                       "DROP TABLE IF EXISTS reviews; DROP INDEX IF EXISTS idx_results_worklist;")
    conn.execute(f"DELETE FROM schema_version WHERE version > {version}")
    for v, tables in LATER_COLUMNS.items():
        if v > version:
            for table, cols in tables.items():
                have = {r[1] for r in conn.execute(f"PRAGMA table_info({table})")}
                for c in cols:
                    if c in have:
                        conn.execute(f"ALTER TABLE {table} DROP COLUMN {c}")
    conn.execute(f"PRAGMA user_version = {version}")
    conn.commit()
    conn.close()


@pytest.mark.parametrize("version", [1, 2, 3, 4])
def test_old_database_gains_reviews_and_keeps_every_row(dirs, bundle_dir, example_images, version) -> None:
    for p in example_images[:4]:
        (dirs["inbox"] / p.name).write_bytes(p.read_bytes())
    (dirs["inbox"] / "junk.txt").write_text("x")
    assert scan_now(dirs, bundle_dir)[0] == 0
    _downgrade_to(dirs["db"], version)
    tables = ("results", "quarantine", "duplicates", "events")
    cols = {t: [r[1] for r in rows(dirs["db"], f"PRAGMA table_info({t})")] for t in tables}
    before = {t: [tuple(r) for r in rows(dirs["db"], f"SELECT * FROM {t} ORDER BY id")] for t in tables}
    conn = connect(dirs["db"])
    migrate(conn)
    migrate(conn)  # idempotent: a second run changes nothing
    conn.close()
    assert rows(dirs["db"], "PRAGMA user_version")[0][0] == SCHEMA_VERSION
    for t, old in before.items():  # every row, every old column, unchanged (later columns come back empty)
        new = [tuple(r) for r in rows(dirs["db"], f"SELECT {', '.join(cols[t])} FROM {t} ORDER BY id")]
        assert new == old, t
    assert len(before["results"]) == 4 and len(before["quarantine"]) == 1
    names = {r[0] for r in rows(dirs["db"], "SELECT name FROM sqlite_master")}
    assert {"reviews", "latest_reviews", "results_reviewed", "idx_results_worklist", "idx_reviews_result"} <= names
    assert rows(dirs["db"], "SELECT count(*) FROM results_reviewed WHERE review_id IS NULL")[0][0] == 4


def test_reviews_are_append_only_and_the_latest_wins(dirs, bundle_dir, example_images) -> None:
    (dirs["inbox"] / "a.jpg").write_bytes(example_images[0].read_bytes())
    scan_now(dirs, bundle_dir)
    conn = sqlite3.connect(dirs["db"])
    ins = ("INSERT INTO reviews (result_id, result_sha256, reviewed_at, reviewer, agree, diagnosis, action) "
           "VALUES (1, 'x', ?, 'dr a', ?, ?, ?)")
    conn.execute(ins, ("2026-11-28T10:00:00.000Z", 1, "mel", "excise"))
    conn.execute(ins, ("2026-11-28T11:00:00.000Z", 0, "nv", "none"))
    conn.commit()
    with pytest.raises(sqlite3.DatabaseError, match="append-only"):
        conn.execute("UPDATE reviews SET diagnosis = 'bcc'")
    with pytest.raises(sqlite3.DatabaseError, match="append-only"):
        conn.execute("DELETE FROM reviews")
    with pytest.raises(sqlite3.IntegrityError):  # CHECK: only the four actions
        conn.execute(ins, ("2026-11-28T12:00:00.000Z", 1, "mel", "burn"))
    conn.close()
    latest = rows(dirs["db"], "SELECT diagnosis, action, agree FROM results_reviewed WHERE id = 1")[0]
    assert tuple(latest) == ("nv", "none", 0)
    assert rows(dirs["db"], "SELECT count(*) FROM reviews")[0][0] == 2
