"""`edge-agent backfill-merge`: the backfill's Parquet rows into a results database, keyed by sha256.

The rows go in through the agent's own store.Writer (its schema, migrations and p_<label> columns), under
the agent's database lock, so the result is a database the agent, `edge-agent results` and the review app
read like any other. Keys, so that merging again (after a resume, a second backfill of an overlapping
archive, or the same output twice) never adds a row twice:

- a result whose sha256 is new -> a `results` row;
- a result whose sha256 is already in `results` (an identical image elsewhere in the archive, or screened
  by the clinic's agent) -> a `duplicates` row naming that result, unless that very path is already the
  result or already a duplicate;
- a quarantine row -> a `quarantine` row unless one exists for the same path and sha256.

Backfilled files stay in the archive: their rows say file_state 'kept' and original_path is the archive's
path, exactly what an agent with after = "keep" records.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..locks import lock_database
from ..share import Share
from ..store import Writer, db_path, now_iso
from .output import QUARANTINE_COLUMNS, BackfillError, OutputDir

log = logging.getLogger(__name__)

BATCH = 2000  # rows per transaction


@dataclass
class Merged:
    results: int = 0
    duplicates: int = 0
    quarantined: int = 0
    already: int = 0
    files: int = 0


def merge(output: str, db: Path, share: Share | None = None) -> Merged:
    """Merge every complete Parquet file of `output` into `db` (created if missing)."""
    import pyarrow.parquet as pq

    out = OutputDir(output)
    state = out.read_state()
    if state is None:
        raise BackfillError(f"{output} is not a backfill output folder (no _backfill/state.json); pass the "
                            "--output folder of `edge-agent backfill`")
    labels = [str(x) for x in state["labels"]]
    lock = lock_database(db)
    try:
        writer = Writer(db, labels, share)
        try:
            cols = {t: {r[1] for r in writer.conn.execute(f"PRAGMA table_info({t})")} for t in
                    ("results", "quarantine")}
            m = Merged()
            for outcome, path in out.parts():
                try:
                    with out.fs.open_input_file(path) as f:
                        pf = pq.ParquetFile(f)
                        for batch in pf.iter_batches(batch_size=BATCH):
                            with writer.transaction():
                                for row in batch.to_pylist():
                                    _merge_row(writer, outcome, row, cols, m)
                except (OSError, ValueError) as e:
                    raise BackfillError(f"cannot read {path} ({e}): it is incomplete (the backfill was stopped "
                                        "while writing it); run the same backfill again to finish it, then merge"
                                        ) from None
                m.files += 1
            with writer.transaction():
                writer.event("backfill_merge", f"{output}: {m.results} results, {m.duplicates} duplicates, "
                                               f"{m.quarantined} quarantined, {m.already} already merged "
                                               f"(model {state.get('model_id')})")
            return m
        finally:
            writer.close()
    finally:
        lock.release()


def _merge_row(w: Writer, outcome: str, row: dict[str, Any], cols: dict[str, set[str]], m: Merged) -> None:
    path = db_path(row["original_path"])
    if outcome == "quarantine":
        sha = row.get("sha256")
        hit = w.conn.execute("SELECT 1 FROM quarantine WHERE original_path = ? AND sha256 IS ? LIMIT 1",
                             (path, sha)).fetchone()
        if hit is not None:
            m.already += 1
            return
        w.insert_quarantine({k: row.get(k) for k in QUARANTINE_COLUMNS if k in cols["quarantine"]})
        m.quarantined += 1
        return
    # p_<label> columns are rebuilt by insert_result from the probabilities (for the labels the database has)
    rec = {k: v for k, v in row.items() if k in cols["results"] and (k == "p_high_risk" or not k.startswith("p_"))}
    rec["probabilities"] = json.loads(row["probabilities"])
    rec.pop("id", None)
    if w.insert_result(rec) is not None:
        m.results += 1
        return
    sha = row["sha256"]
    rid = w.result_id(sha)
    same = w.conn.execute("SELECT 1 FROM results WHERE id = ? AND original_path = ?", (rid, path)).fetchone()
    twin = w.conn.execute("SELECT 1 FROM duplicates WHERE sha256 = ? AND original_path = ? LIMIT 1",
                          (sha, path)).fetchone()
    if same is not None or twin is not None:
        m.already += 1
        return
    w.insert_duplicate({"sha256": sha, "result_id": rid, "original_name": row["original_name"],
                        "original_path": row["original_path"], "stored_path": None, "file_state": "kept",
                        "received_at": row["received_at"], "recorded_at": now_iso()})
    m.duplicates += 1
