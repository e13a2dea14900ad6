"""The backfill's output folder: Parquet rows with the meaning of `results` and `quarantine`, and its state.

Layout (any pyarrow filesystem: a local folder, NFS, or an object-store URI):

    <output>/_backfill/state.json      what this backfill is (source, listing, bundle, policy): a resume must match
    <output>/_backfill/inputs.jsonl    the listing of a directory tree (inputs.py); a manifest is used in place
    <output>/outcome=result/*.parquet      one row per screened image: the `results` columns
    <output>/outcome=quarantine/*.parquet  one row per refused input: the `quarantine` columns

Every row also carries `input_key`, the byte offset of its input's line in the listing: what a resumed run
compares to skip what is written. Files are staged and published by a move while their run owns the folder
(publish.py), so a run's files appear whole; a file without a footer (written by an older version in place,
or torn on an object store) is not counted as written and is deleted at the next start (its inputs are
screened again). Rows written twice (only a straggler slower than the object-store grace) are reported and
merged once (merge.py dedups by sha256/path).
"""
from __future__ import annotations

import json
import logging
import posixpath
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from .inputs import output_fs

log = logging.getLogger(__name__)

STATE_VERSION = 1
PARTITION = "outcome"

# The results columns (store._migration_1/_2; probabilities as the JSON text the database keeps) and their
# Arrow types; keys that result_row adds later (e.g. a new score) are carried with an inferred type.
RESULT_TYPES: dict[str, str] = {
    "sha256": "string", "original_name": "string", "original_path": "string", "stored_path": "string",
    "file_state": "string", "received_at": "string", "processed_at": "string", "model_id": "string",
    "model_variant": "string", "manifest_sha256": "string", "policy": "string", "fallback": "int64",
    "label": "string", "label_name": "string", "confidence": "float64", "p_high_risk": "float64",
    "probabilities": "string", "needs_review": "int64", "review_reasons": "string", "high_risk_rules": "string",
    "quality_issues": "string", "sharpness": "float64", "brightness": "float64", "clipped_dark": "float64",
    "clipped_bright": "float64", "image_format": "string", "width": "int64", "height": "int64",
    "decode_reduction": "int64", "spot_checked": "int64", "spot_label": "string", "latency_ms": "float64",
    "ood_score": "float64", "calibration_id": "string",
}
QUARANTINE_TYPES: dict[str, str] = {
    "reason_code": "string", "reason": "string", "size_bytes": "int64", "quarantined_at": "string",
}
QUARANTINE_COLUMNS = ("sha256", "original_name", "original_path", "stored_path", "file_state", "reason_code",
                      "reason", "size_bytes", "received_at", "quarantined_at")


def _infer_type(values: list[Any]) -> str:
    for v in values:
        if v is None:
            continue
        if isinstance(v, bool) or isinstance(v, (int, np.integer)):
            return "int64"
        if isinstance(v, (float, np.floating)):
            return "float64"
        return "string"
    return "string"


def _cell(v: Any, typ: str) -> Any:
    if v is None:
        return None
    if typ == "string" and not isinstance(v, str):
        return json.dumps(v, separators=(",", ":")) if isinstance(v, (dict, list)) else str(v)
    if typ == "int64":
        return int(v)
    if typ == "float64":
        return float(v)
    return v


def rows_to_table(rows: list[dict[str, Any]], labels: tuple[str, ...]) -> Any:
    """An Arrow table of result and quarantine rows (key `outcome`), with one stable schema per label set."""
    import pyarrow as pa

    types: dict[str, str] = {"input_key": "int64", PARTITION: "string", **RESULT_TYPES, **QUARANTINE_TYPES}
    types.update({f"p_{lab}": "float64" for lab in labels})
    extra = sorted({k for r in rows for k in r} - set(types))
    for k in extra:
        types[k] = _infer_type([r.get(k) for r in rows])
    pa_types = {"int64": pa.int64(), "float64": pa.float64(), "string": pa.string()}
    schema = pa.schema([(k, pa_types[t]) for k, t in types.items()])
    cols = {k: [_cell(r.get(k), t) for r in rows] for k, t in types.items()}
    return pa.Table.from_pydict(cols, schema=schema)


def result_record(row: dict[str, Any], labels: tuple[str, ...]) -> dict[str, Any]:
    """A result_row (pipeline.py) as the database stores it: probabilities as JSON text plus p_<label>."""
    out = dict(row)
    probs = out.pop("probabilities")
    out["probabilities"] = json.dumps(probs, separators=(",", ":"))
    for lab in labels:
        out[f"p_{lab}"] = probs.get(lab)
    return out


# --- the folder ---------------------------------------------------------------------------------

class BackfillError(RuntimeError):
    """The backfill cannot start or continue; the message says why and what to do."""


class BackfillFailed(RuntimeError):
    """The job failed while running (Ray, the nodes, a disk): what was written is kept; run it again."""


@dataclass
class Written:
    """What the output folder holds: input keys written (sorted, unique), rows written twice, files dropped."""

    keys: np.ndarray
    results: int
    quarantined: int
    repeated: int
    dropped: list[str]


class OutputDir:
    def __init__(self, location: str) -> None:
        self.location = location
        self.fs, self.base = output_fs(location)

    @property
    def meta(self) -> str:
        return posixpath.join(self.base, "_backfill")

    @property
    def state_path(self) -> str:
        return posixpath.join(self.meta, "state.json")

    @property
    def tree_listing(self) -> str:
        return posixpath.join(self.meta, "inputs.jsonl")

    def read_meta(self, path: str) -> bytes | None:
        """A small file under _backfill/ (None when it does not exist)."""
        import pyarrow.fs as pafs

        if self.fs.get_file_info(path).type == pafs.FileType.NotFound:
            return None
        with self.fs.open_input_stream(path) as f:
            return bytes(f.read())

    def write_meta(self, path: str, data: bytes) -> None:
        """Replace a small file under _backfill/ whole (written aside, then moved over it)."""
        self.fs.create_dir(self.meta, recursive=True)
        tmp = path + ".tmp"
        with self.fs.open_output_stream(tmp) as f:
            f.write(data)
        self.fs.move(tmp, path)

    def read_state(self) -> dict[str, Any] | None:
        raw = self.read_meta(self.state_path)
        if raw is None:
            return None
        try:
            state = json.loads(raw)
        except ValueError as e:
            raise BackfillError(f"{self.state_path} is damaged ({e}); use a new --output folder") from None
        if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
            raise BackfillError(f"{self.state_path} was written by another version of the backfill; use a new "
                                "--output folder")
        return state

    def write_state(self, state: dict[str, Any]) -> None:
        self.write_meta(self.state_path, json.dumps(state, indent=2, sort_keys=True).encode())

    def parts(self) -> Iterator[tuple[str, str]]:
        """(outcome, path) of every Parquet file, in name order."""
        import pyarrow.fs as pafs

        for outcome in ("result", "quarantine"):
            d = posixpath.join(self.base, f"{PARTITION}={outcome}")
            if self.fs.get_file_info(d).type != pafs.FileType.Directory:
                continue
            infos = self.fs.get_file_info(pafs.FileSelector(d, recursive=True))
            for p in sorted(i.path for i in infos if i.type == pafs.FileType.File and i.path.endswith(".parquet")):
                yield outcome, p

    def written(self, drop_incomplete: bool = True) -> Written:
        """Scan the Parquet files (footers and the input_key column only). Files without a readable footer
        were cut off by a kill: deleted when `drop_incomplete` (their inputs are screened again)."""
        import pyarrow.parquet as pq

        chunks: list[np.ndarray] = []
        counts = {"result": 0, "quarantine": 0}
        dropped: list[str] = []
        for outcome, p in self.parts():
            try:
                with self.fs.open_input_file(p) as f:
                    t = pq.read_table(f, columns=["input_key"])
            except (OSError, ValueError) as e:
                dropped.append(p)
                if drop_incomplete:
                    log.warning("dropping %s: it was cut off before it was complete (%s); its images are "
                                "screened again", p, e)
                    self.fs.delete_file(p)
                continue
            chunks.append(t.column("input_key").to_numpy())
            counts[outcome] += t.num_rows
        allkeys = np.concatenate(chunks) if chunks else np.zeros(0, np.int64)
        keys = np.unique(allkeys)
        return Written(keys, counts["result"], counts["quarantine"], int(len(allkeys) - len(keys)), dropped)
