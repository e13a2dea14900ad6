"""Reading the results database for people and scripts: `edge-agent results`, `quarantine`, `duplicates`.

Why a module of its own: what staff read is a worklist, not a table dump. The
newest (or riskiest) images come first, so `--limit 20` means "the 20 that
matter now"; a label is asked for as a person says it (`MEL`, `melanoma`)
and a label that does not exist is refused instead of silently matching
nothing; an image that failed the quality check reads "retake: too dark", not
a diagnosis-looking label (its probabilities stay in the database and in
JSON); times read in local time, as `--since` is typed (the database stays
UTC). Everything here only reads: connections are opened read-only by the
caller.
"""
from __future__ import annotations

import json
import re
import sqlite3
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from .store import fs_path, to_iso

SORTS = ("newest", "oldest", "risk")
LIST_SORTS = ("newest", "oldest")
FORMATS = ("table", "csv", "json", "ndjson")

# ORDER BY clauses, constants only (the SQL is never built from user text).
_RESULT_ORDER = {
    "newest": " ORDER BY processed_at DESC, id DESC",
    "oldest": " ORDER BY processed_at, id",
    # P(malignant) = the calibrated probability summed over the bundle's high-risk labels; ties by recency
    "risk": " ORDER BY p_high_risk DESC, processed_at DESC, id DESC",
}
_QUARANTINE_ORDER = {"newest": " ORDER BY quarantined_at DESC, id DESC", "oldest": " ORDER BY quarantined_at, id"}
_DUPLICATE_ORDER = {"newest": " ORDER BY d.recorded_at DESC, d.id DESC", "oldest": " ORDER BY d.recorded_at, d.id"}

# Words for the machine codes stored in the database.
REASON_WORDS = {"high_risk": "high risk", "low_confidence": "low confidence", "poor_quality": "poor quality",
                "model_disagreement": "models disagree", "out_of_distribution": "unlike the training images"}
QUALITY_WORDS = {"blurry": "blurry", "too_dark": "too dark", "overexposed": "overexposed"}
FILE_STATE_WORDS = {"deleted": "(deleted after screening)", "missing": "(missing: neither in the inbox nor stored)",
                    "replaced": "(replaced in the inbox by another file)",
                    "pruned": "(removed by retention; the result stays)"}


class QueryError(ValueError):
    """A filter that cannot match (e.g. an unknown label); the message lists what is valid."""


# --- labels -------------------------------------------------------------------------------

@dataclass(frozen=True)
class Labels:
    """The labels a database knows, with their human names (code -> name)."""

    names: dict[str, str]

    def describe(self) -> str:
        return ", ".join(f"{c} ({n})" if n and n != c else c for c, n in sorted(self.names.items())) or "none yet"

    def resolve(self, text: str) -> str:
        """The label code for a code or a human name, case-insensitively; QueryError if it is neither."""
        want = text.strip().casefold()
        for code, name in self.names.items():
            if want in (code.casefold(), (name or "").casefold()):
                return code
        raise QueryError(f"unknown label {text!r}: use one of {self.describe()} (the code or the name, any case)")


def known_labels(conn: sqlite3.Connection, bundle: Path | None = None) -> Labels:
    """Labels from the database (its p_<label> columns and the labels/names of its results) and, for their
    human names, from the model bundle's manifest when one is given (read as JSON only: never loaded)."""
    names: dict[str, str] = {}
    cols = [r[1] for r in conn.execute("PRAGMA table_info(results)")]
    for c in cols:
        if c.startswith("p_") and c != "p_high_risk":
            names.setdefault(c[2:], "")
    for code, name in conn.execute("SELECT DISTINCT label, label_name FROM results"):
        if isinstance(code, str):
            if name or code not in names:
                names[code] = name or names.get(code, "")
    manifest = _manifest_names(bundle)
    if not names:  # a new database: the bundle says which labels there will be
        names = dict(manifest)
    for code, name in manifest.items():
        if code in names and not names[code]:
            names[code] = name
    return Labels(names)


def _manifest_names(bundle: Path | None) -> dict[str, str]:
    if bundle is None:
        return {}
    try:
        m = json.loads((bundle / "manifest.json").read_text())
    except (OSError, ValueError):
        return {}
    labels = m.get("labels") if isinstance(m, dict) else None
    names = m.get("label_names") if isinstance(m, dict) else None
    if not isinstance(labels, list):
        return {}
    names = names if isinstance(names, dict) else {}
    return {x: str(names.get(x, "")) for x in labels if isinstance(x, str)}


# --- times --------------------------------------------------------------------------------

_REL = re.compile(r"^(\d+)\s*([smhdw])$")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


def parse_since(text: str, now: datetime | None = None) -> str:
    """'2h', '30m', '7d', 'today', 'yesterday', or an ISO date/time (local time unless it has an offset);
    returns the UTC ISO text the database compares with. ValueError with the accepted forms otherwise."""
    now = now or datetime.now(timezone.utc)
    t = text.strip().lower()
    m = _REL.match(t)
    if m:
        return to_iso(now - timedelta(**{_UNITS[m.group(2)]: int(m.group(1))}))
    local_midnight = now.astimezone().replace(hour=0, minute=0, second=0, microsecond=0)
    if t == "today":
        return to_iso(local_midnight)
    if t == "yesterday":
        return to_iso(local_midnight - timedelta(days=1))
    try:
        dt = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(f"{text!r} is not a time; use e.g. 2h, 30m, 7d, today, yesterday, 2026-11-21 or "
                         "2026-11-21T14:30") from None
    if dt.tzinfo is None:
        dt = dt.astimezone()  # naive -> local time, as a person typing it means
    return to_iso(dt)


def show_time(iso: str | None, utc: bool = False) -> str:
    """A database time (UTC ISO) as a person reads it: local time (or UTC), to the second."""
    if not iso:
        return ""
    try:
        dt = datetime.fromisoformat(iso.replace("Z", "+00:00"))
    except ValueError:
        return iso
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=timezone.utc)
    return (dt.astimezone(timezone.utc) if utc else dt.astimezone()).strftime("%Y-%m-%d %H:%M:%S")


def time_header(what: str, utc: bool = False) -> str:
    if utc:
        return f"{what} (UTC)"
    return f"{what} ({datetime.now().astimezone().strftime('%Z') or 'local'})"


# --- queries --------------------------------------------------------------------------------

def query_results(conn: sqlite3.Connection, flagged: bool = False, since: str | None = None,
                  label: str | None = None, limit: int | None = None, sort: str = "newest") -> list[dict[str, Any]]:
    """Result rows (all columns), filtered; `label` must be a code (resolve names with Labels.resolve)."""
    if sort not in _RESULT_ORDER:
        raise QueryError(f"unknown sort {sort!r}; use one of {', '.join(SORTS)}")
    where: list[str] = []
    params: list[Any] = []
    if flagged:
        where.append("needs_review = 1")
    if since:
        where.append("processed_at >= ?")
        params.append(since)
    if label:
        where.append("label = ?")
        params.append(label)
    sql = "SELECT * FROM results" + (f" WHERE {' AND '.join(where)}" if where else "") + _RESULT_ORDER[sort]
    return _fetch(conn, sql, params, limit)


SQL_MAX_INT = 2**63 - 1


def sql_limit(limit: int) -> int:
    """--limit as SQLite can bind it: any N beyond a 64-bit integer already means "all rows" (binding it raised
    OverflowError, a traceback for `--limit 99999999999999999999`)."""
    return min(int(limit), SQL_MAX_INT)


def _fetch(conn: sqlite3.Connection, sql: str, params: list[Any], limit: int | None) -> list[dict[str, Any]]:
    """Run a listing query, with `LIMIT ?` when a limit is given."""
    if limit:
        sql += " LIMIT ?"
        params = [*params, sql_limit(limit)]
    return [dict(r) for r in conn.execute(sql, params)]


def query_quarantine(conn: sqlite3.Connection, since: str | None = None, limit: int | None = None,
                     sort: str = "newest") -> list[dict[str, Any]]:
    """Quarantine rows: what was refused, why (in words), and where the file is now."""
    sql = "SELECT * FROM quarantine" + (" WHERE quarantined_at >= ?" if since else "") + _QUARANTINE_ORDER[sort]
    params: list[Any] = [since] if since else []
    return _fetch(conn, sql, params, limit)


def query_duplicates(conn: sqlite3.Connection, since: str | None = None, limit: int | None = None,
                     sort: str = "newest") -> list[dict[str, Any]]:
    """Duplicate rows with the result they repeat (its file name, label and time)."""
    sql = ("SELECT d.*, r.original_name AS first_name, r.processed_at AS first_processed_at, r.label AS first_label, "
           "r.label_name AS first_label_name FROM duplicates d LEFT JOIN results r ON r.id = d.result_id"
           + (" WHERE d.recorded_at >= ?" if since else "") + _DUPLICATE_ORDER[sort])
    params: list[Any] = [since] if since else []
    return _fetch(conn, sql, params, limit)


# --- presenting -------------------------------------------------------------------------------

def _split(text: str | None) -> list[str]:
    return [x for x in (text or "").split(",") if x]


def quality_words(row: Mapping[str, Any]) -> str:
    return ", ".join(QUALITY_WORDS.get(x, x.replace("_", " ")) for x in _split(row.get("quality_issues")))


def result_text(row: Mapping[str, Any]) -> str:
    """What the table shows as the outcome: the label and its probability, or "retake: <why>" for an image
    that failed the quality check (a label read from a blank or blurred photo is not a finding)."""
    if "poor_quality" in _split(row.get("review_reasons")):
        return f"retake: {quality_words(row) or 'poor quality'}"
    name = row.get("label_name")
    label = str(row.get("label") or "")
    shown = f"{label} ({name})" if name and name != label else label
    conf = row.get("confidence")
    return f"{shown} {conf:.2f}" if isinstance(conf, (int, float)) else shown


def reasons_text(row: Mapping[str, Any]) -> str:
    return ", ".join(REASON_WORDS.get(x, x.replace("_", " ")) for x in _split(row.get("review_reasons")))


def where_now(row: Mapping[str, Any]) -> str:
    """Where the image is now, from its row: the stored copy, the inbox (kept), or what became of it."""
    state = row.get("file_state")
    if state in FILE_STATE_WORDS:
        return FILE_STATE_WORDS[state]
    if state == "kept":
        return str(fs_path(row.get("original_path")) or "")
    stored = fs_path(row.get("stored_path"))
    if stored:
        return stored + (" (being moved)" if state == "pending" else "")
    return str(fs_path(row.get("original_path")) or "") + (" (still in the inbox)" if state == "pending" else "")


def risk_text(row: Mapping[str, Any]) -> str:
    p = row.get("p_high_risk")
    return f"{p:.2f}" if isinstance(p, (int, float)) else ""


RESULT_HEADERS = ("id", "processed", "file", "result", "P(malignant)", "review", "reasons", "stored at")
QUARANTINE_HEADERS = ("id", "quarantined", "file", "reason", "code", "stored at")
DUPLICATE_HEADERS = ("id", "recorded", "file", "same content as", "stored at")


def result_table(rows: Iterable[Mapping[str, Any]], utc: bool = False) -> list[list[str]]:
    return [[str(r["id"]), show_time(r.get("processed_at"), utc), str(r.get("original_name") or ""), result_text(r),
             risk_text(r), "REVIEW" if r.get("needs_review") else "", reasons_text(r), where_now(r)] for r in rows]


def quarantine_table(rows: Iterable[Mapping[str, Any]], utc: bool = False) -> list[list[str]]:
    return [[str(r["id"]), show_time(r.get("quarantined_at"), utc), str(r.get("original_name") or ""),
             str(r.get("reason") or ""), str(r.get("reason_code") or ""), where_now(r)] for r in rows]


def duplicate_reason(row: Mapping[str, Any], utc: bool = False) -> str:
    """A duplicate in words: which result it repeats."""
    first = row.get("first_name")
    if first is None:
        return f"result #{row.get('result_id')}"
    return (f"result #{row.get('result_id')} {first} (screened {show_time(row.get('first_processed_at'), utc)}, "
            f"{row.get('first_label')})")


def duplicate_table(rows: Iterable[Mapping[str, Any]], utc: bool = False) -> list[list[str]]:
    return [[str(r["id"]), show_time(r.get("recorded_at"), utc), str(r.get("original_name") or ""),
             duplicate_reason(r, utc), where_now(r)] for r in rows]


def for_json(rows: Sequence[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    """Rows for JSON/NDJSON: the database's values (times in UTC), JSON columns decoded, plus `where` (where
    the file is now) and, for results, `shown` (what the table prints) and for duplicates `reason`."""
    out = []
    for r in rows:
        r = dict(r)
        for col in ("probabilities", "policy"):
            if isinstance(r.get(col), str):
                try:
                    r[col] = json.loads(r[col])
                except ValueError:
                    pass
        r["where"] = where_now(r)
        if kind == "results":
            r["shown"] = result_text(r)
        elif kind == "duplicates":
            r["reason"] = f"same content as {duplicate_reason(r, utc=True)}"
        out.append(r)
    return out
