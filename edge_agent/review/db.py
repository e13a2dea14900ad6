"""What the review app reads and writes in the results database.

Two kinds of connection, on purpose:
- reads: a read-only connection per request (`mode=ro`), so no page can change anything;
- verdicts: `ReviewWriter`, a separate connection whose only statement is one INSERT INTO reviews, in a short
  BEGIN IMMEDIATE transaction with a short busy timeout. The screening agent's writer holds the write lock
  only for a batch commit (milliseconds), so a verdict waits for it at most VERDICT_BUSY_MS and otherwise
  says "busy, not saved, submit again" - it never blocks the agent for longer than one INSERT.

The worklist order is a constant (needs review first, then calibrated P(malignant), then newest): keyset
paging over the index `idx_results_worklist` (store.py) reads only the rows of one page, however deep.
"""
from __future__ import annotations

import json
import re
import sqlite3
from dataclasses import dataclass, field
from datetime import date, timedelta
from pathlib import Path
from typing import Any

from ..query import REASON_WORDS, QUALITY_WORDS, parse_since, sql_limit
from ..store import SCHEMA_VERSION, StoreError, connect, db_text, migrate, now_iso

VERDICT_BUSY_MS = 3000
_DATE_ONLY = re.compile(r"^\d{4}-\d{2}-\d{2}$")
PAGE_SIZES = (25, 50, 100, 200)
ACTIONS = {"none": "none", "follow_up": "follow-up", "excise": "excise", "refer": "refer"}
REVIEWED_CHOICES = ("all", "no", "yes")
MAX_TEXT = {"reviewer": 120, "diagnosis": 64, "histopathology": 2000, "note": 4000}

_ORDER_DESC = " ORDER BY needs_review DESC, coalesce(p_high_risk, -1.0) DESC, id DESC"
_ORDER_ASC = " ORDER BY needs_review ASC, coalesce(p_high_risk, -1.0) ASC, id ASC"
_LIST_COLS = ("id, sha256, original_name, processed_at, received_at, label, label_name, confidence, p_high_risk, "
              "needs_review, review_reasons, quality_issues, file_state, stored_path, model_id, model_variant, "
              "coalesce(p_high_risk, -1.0) AS risk_key")


class DatabaseBusy(RuntimeError):
    """The screening agent (or another program) holds the write lock longer than a verdict may wait."""


class VerdictError(ValueError):
    """A verdict form that cannot be stored; `problems` maps field -> what is wrong (shown next to it)."""

    def __init__(self, problems: dict[str, str]) -> None:
        super().__init__("; ".join(f"{k}: {v}" for k, v in problems.items()))
        self.problems = problems


def ensure_schema(path: Path) -> None:
    """Bring the database to this version's schema (adds `reviews` to a version-1/2 database; never touches
    result rows). Needed once; the screening agent does the same at its start."""
    conn = connect(path)
    try:
        migrate(conn)
    finally:
        conn.close()


def open_read(path: Path) -> sqlite3.Connection:
    conn = connect(path, readonly=True)
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    if version < SCHEMA_VERSION or not _has_table(conn, "reviews"):
        conn.close()
        raise StoreError(f"the database {path} has schema version {version} without the reviews table; start "
                         "`edge-agent review` once with write access (or restart the agent) to add it")
    return conn


def _has_table(conn: sqlite3.Connection, name: str) -> bool:
    return conn.execute("SELECT 1 FROM sqlite_master WHERE name = ?", (name,)).fetchone() is not None


# --- filters ----------------------------------------------------------------------------------

@dataclass
class Filters:
    """The worklist filters, as parsed from the query string (unknown values are refused, not ignored)."""

    since: str = ""
    until: str = ""
    label: str = ""
    reason: str = ""
    reviewed: str = "all"
    flagged: bool = False
    size: int = 50
    problems: list[str] = field(default_factory=list)

    @classmethod
    def parse(cls, args: Any, labels: dict[str, str]) -> "Filters":
        f = cls()
        for name in ("since", "until"):
            raw = str(args.get(name, "") or "").strip()[:64]
            if raw:
                try:
                    if name == "until" and _DATE_ONLY.match(raw):  # "until 2026-11-28" includes that day
                        raw = (date.fromisoformat(raw) + timedelta(days=1)).isoformat()
                    setattr(f, name, parse_since(raw))
                except ValueError as e:
                    f.problems.append(str(e))
        label = str(args.get("label", "") or "").strip()
        if label:
            if label in labels:
                f.label = label
            else:
                f.problems.append(f"unknown label {label[:40]!r}: choose one of the list")
        reason = str(args.get("reason", "") or "").strip()
        if reason:
            if reason in REASON_WORDS:
                f.reason = reason
            else:
                f.problems.append(f"unknown reason {reason[:40]!r}: choose one of the list")
        reviewed = str(args.get("reviewed", "all") or "all")
        if reviewed in REVIEWED_CHOICES:
            f.reviewed = reviewed
        else:
            f.problems.append(f"'reviewed' must be one of {', '.join(REVIEWED_CHOICES)}")
        f.flagged = str(args.get("flagged", "")) in ("1", "on", "yes", "true")
        try:
            size = int(str(args.get("size", "50")))
            f.size = size if size in PAGE_SIZES else 50
        except ValueError:
            f.size = 50
        return f

    def where(self) -> tuple[list[str], list[Any]]:
        where: list[str] = []
        params: list[Any] = []
        if self.since:
            where.append("processed_at >= ?")
            params.append(self.since)
        if self.until:
            where.append("processed_at < ?")
            params.append(self.until)
        if self.label:
            where.append("label = ?")
            params.append(self.label)
        if self.reason:
            # review_reasons is a comma list of plain codes (triage.py); match whole items
            where.append("(',' || review_reasons || ',') LIKE ?")
            params.append(f"%,{self.reason},%")
        if self.flagged:
            where.append("needs_review = 1")
        if self.reviewed == "yes":
            where.append("EXISTS (SELECT 1 FROM reviews v WHERE v.result_id = results.id)")
        elif self.reviewed == "no":
            where.append("NOT EXISTS (SELECT 1 FROM reviews v WHERE v.result_id = results.id)")
        return where, params

    def query_args(self) -> dict[str, str]:
        """The filters as query-string arguments (raw ISO times), for links that keep them."""
        out = {"since": self.since, "until": self.until, "label": self.label, "reason": self.reason,
               "reviewed": "" if self.reviewed == "all" else self.reviewed, "flagged": "1" if self.flagged else "",
               "size": "" if self.size == 50 else str(self.size)}
        return {k: v for k, v in out.items() if v}


# --- keyset cursors --------------------------------------------------------------------------------

def encode_key(row: sqlite3.Row | dict[str, Any]) -> str:
    return f"{int(row['needs_review'])}~{float(row['risk_key'])!r}~{int(row['id'])}"


def decode_key(text: str) -> tuple[int, float, int] | None:
    """A cursor from the query string, or None if it is not one (a malformed cursor shows the first page)."""
    parts = str(text or "").split("~")
    if len(parts) != 3:
        return None
    try:
        nr, p, rid = int(parts[0]), float(parts[1]), int(parts[2])
    except ValueError:
        return None
    if nr not in (0, 1) or p != p or abs(p) > 2 or rid < 0 or rid > 2**62:
        return None
    return nr, p, rid


@dataclass
class Page:
    rows: list[dict[str, Any]]
    first: bool
    last: bool
    total: int


def _walk(conn: sqlite3.Connection, where: list[str], params: list[Any], key: tuple[int, float, int] | None,
          n: int, forward: bool) -> list[dict[str, Any]]:
    """Up to n rows strictly after `key` in worklist order (forward) or strictly before it (backwards, nearest
    first). The condition "(needs_review, risk, id) < key" is asked as three range queries that each use
    idx_results_worklist as an index range (SQLite uses an expression index for `=`/`<` on the expression,
    not for a row-value or OR condition), so a page deep in 100,000 rows costs what the first page costs."""
    order, lt = (_ORDER_DESC, "<") if forward else (_ORDER_ASC, ">")
    if key is None:
        steps: list[tuple[str, tuple[Any, ...]]] = [("", ())]
    else:
        nr, rk, rid = key
        steps = [(f"needs_review = ? AND coalesce(p_high_risk, -1.0) = ? AND id {lt} ?", (nr, rk, rid)),
                 (f"needs_review = ? AND coalesce(p_high_risk, -1.0) {lt} ?", (nr, rk)),
                 (f"needs_review {lt} ?", (nr,))]
    out: list[dict[str, Any]] = []
    for cond, extra in steps:
        if len(out) >= n:
            break
        conds = [*where, cond] if cond else list(where)
        sql = f"SELECT {_LIST_COLS} FROM results" + (" WHERE " + " AND ".join(conds) if conds else "") + order
        out += [dict(r) for r in conn.execute(sql + " LIMIT ?", (*params, *extra, sql_limit(n - len(out))))]
    return out


def worklist(conn: sqlite3.Connection, f: Filters, after: str = "", before: str = "", end: bool = False) -> Page:
    """One page of the worklist: from the top, after a cursor, before a cursor, or the last page (end)."""
    where, params = f.where()
    k_after, k_before = decode_key(after), decode_key(before)
    n = f.size
    if k_before is not None or end:
        rows = _walk(conn, where, params, k_before, n + 1, forward=False)
        first = len(rows) <= n
        rows = rows[:n][::-1]
        last = k_before is None
    else:
        rows = _walk(conn, where, params, k_after, n + 1, forward=True)
        last = len(rows) <= n
        rows = rows[:n]
        first = k_after is None
    base = " WHERE " + " AND ".join(where) if where else ""
    total = conn.execute("SELECT count(*) FROM results" + base, params).fetchone()[0]
    _attach_reviews(conn, rows)
    return Page(rows, first, last, int(total))


def _attach_reviews(conn: sqlite3.Connection, rows: list[dict[str, Any]]) -> None:
    ids = [r["id"] for r in rows]
    if not ids:
        return
    marks = ",".join("?" for _ in ids)
    latest = {r["result_id"]: dict(r) for r in conn.execute(
        f"SELECT * FROM latest_reviews WHERE result_id IN ({marks})", ids)}
    for r in rows:
        r["review"] = latest.get(r["id"])


def neighbours(conn: sqlite3.Connection, f: Filters, row: dict[str, Any]) -> tuple[int | None, int | None]:
    """(previous id, next id) of a case in the worklist order under the same filters."""
    where, params = f.where()
    key = (int(row["needs_review"]), float(row["p_high_risk"] if row["p_high_risk"] is not None else -1.0),
           int(row["id"]))
    prev = _walk(conn, where, params, key, 1, forward=False)
    nxt = _walk(conn, where, params, key, 1, forward=True)
    return (int(prev[0]["id"]) if prev else None), (int(nxt[0]["id"]) if nxt else None)


def counts(conn: sqlite3.Connection) -> dict[str, int]:
    one = lambda sql: int(conn.execute(sql).fetchone()[0])  # noqa: E731
    return {
        "results": one("SELECT count(*) FROM results"),
        "flagged": one("SELECT count(*) FROM results WHERE needs_review = 1"),
        "flagged_open": one("SELECT count(*) FROM results WHERE needs_review = 1 AND NOT EXISTS "
                            "(SELECT 1 FROM reviews v WHERE v.result_id = results.id)"),
        "reviewed": one("SELECT count(DISTINCT result_id) FROM reviews"),
        "quarantined": one("SELECT count(*) FROM quarantine"),
    }


def result(conn: sqlite3.Connection, rid: int) -> dict[str, Any] | None:
    r = conn.execute("SELECT *, coalesce(p_high_risk, -1.0) AS risk_key FROM results WHERE id = ?",
                     (rid,)).fetchone()
    if r is None:
        return None
    row = dict(r)
    try:
        probs = json.loads(row.get("probabilities") or "{}")
        row["probs"] = {str(k): float(v) for k, v in probs.items()} if isinstance(probs, dict) else {}
    except (ValueError, TypeError):
        row["probs"] = {}
    row["reasons"] = [x for x in (row.get("review_reasons") or "").split(",") if x]
    row["quality"] = [x for x in (row.get("quality_issues") or "").split(",") if x]
    return row


def reviews_of(conn: sqlite3.Connection, rid: int) -> list[dict[str, Any]]:
    return [dict(r) for r in conn.execute("SELECT * FROM reviews WHERE result_id = ? ORDER BY id DESC", (rid,))]


def quarantine_rows(conn: sqlite3.Connection, limit: int = 200, before_id: int | None = None) -> list[dict[str, Any]]:
    sql = "SELECT * FROM quarantine" + (" WHERE id < ?" if before_id else "") + " ORDER BY id DESC LIMIT ?"
    params: tuple[Any, ...] = (before_id, limit) if before_id else (limit,)
    return [dict(r) for r in conn.execute(sql, params)]


def quarantine_row(conn: sqlite3.Connection, qid: int) -> dict[str, Any] | None:
    r = conn.execute("SELECT * FROM quarantine WHERE id = ?", (qid,)).fetchone()
    return None if r is None else dict(r)


def export_rows(conn: sqlite3.Connection, only_reviewed: bool = False) -> list[dict[str, Any]]:
    """Every result with its latest verdict (results_reviewed), worklist order; for CSV/JSON audits."""
    sql = ("SELECT * FROM results_reviewed" + (" WHERE review_id IS NOT NULL" if only_reviewed else "")
           + " ORDER BY needs_review DESC, coalesce(p_high_risk, -1.0) DESC, id DESC")
    return [dict(r) for r in conn.execute(sql)]


def all_reviews(conn: sqlite3.Connection) -> list[dict[str, Any]]:
    """The whole review history (every verdict, superseded ones included), oldest first."""
    return [dict(r) for r in conn.execute(
        "SELECT v.*, r.original_name, r.label AS model_label, r.p_high_risk FROM reviews v "
        "JOIN results r ON r.id = v.result_id ORDER BY v.id")]


# --- verdicts ---------------------------------------------------------------------------------------

def parse_verdict(form: Any, labels: dict[str, str]) -> dict[str, Any]:
    """Validate a verdict form; VerdictError with a message per bad field."""
    problems: dict[str, str] = {}
    get = lambda k: str(form.get(k, "") or "")  # noqa: E731
    agree = get("agree")
    if agree not in ("agree", "disagree"):
        problems["agree"] = "choose agree or disagree with the flag"
    diagnosis = get("diagnosis").strip()
    if diagnosis != "other" and diagnosis not in labels:
        problems["diagnosis"] = "choose a diagnosis from the list (or 'other', with a note)"
    action = get("action")
    if action not in ACTIONS:
        problems["action"] = f"choose an action: {', '.join(ACTIONS.values())}"
    reviewer = " ".join(get("reviewer").split())
    if not reviewer:
        problems["reviewer"] = "enter your name (it is stored with the verdict)"
    out = {"agree": 1 if agree == "agree" else 0, "diagnosis": diagnosis, "action": action, "reviewer": reviewer,
           "histopathology": get("histopathology").strip(), "note": get("note").strip()}
    for k, n in MAX_TEXT.items():
        if len(out[k]) > n:
            problems[k] = f"too long ({len(out[k])} characters, at most {n})"
    if diagnosis == "other" and not out["note"] and "note" not in problems:
        problems["note"] = "say what the diagnosis is when you choose 'other'"
    for k, v in out.items():
        if isinstance(v, str) and any(ord(c) < 32 and c not in "\n\r\t" for c in v):
            problems[k] = "contains control characters"
    if problems:
        raise VerdictError(problems)
    return out


_READ_ACTIONS = {sqlite3.SQLITE_READ, sqlite3.SQLITE_SELECT, sqlite3.SQLITE_TRANSACTION, sqlite3.SQLITE_FUNCTION}
_PRAGMAS_ALLOWED = {"busy_timeout", "foreign_keys"}


def _only_insert_reviews(action: int, arg1: str | None, arg2: str | None, db_name: str | None,
                         source: str | None) -> int:
    """SQLite authorizer of the verdict connection: reads, transactions, the two pragmas it sets, and INSERT
    INTO reviews; everything else (UPDATE/DELETE anywhere, INSERT elsewhere, DDL, ATTACH) is denied by SQLite
    itself, whatever SQL reaches this connection. (The triggers that keep reviews append-only run as part of
    an INSERT's program; they are never reached by an INSERT.)"""
    if action in _READ_ACTIONS:
        return sqlite3.SQLITE_OK
    if action == sqlite3.SQLITE_INSERT and arg1 == "reviews":
        return sqlite3.SQLITE_OK
    if action == sqlite3.SQLITE_PRAGMA and arg1 in _PRAGMAS_ALLOWED:
        return sqlite3.SQLITE_OK
    return sqlite3.SQLITE_DENY


class ReviewWriter:
    """The review app's only writing connection: it INSERTs into reviews and nothing else (an SQLite
    authorizer denies every other write, see _only_insert_reviews)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def connect(self) -> sqlite3.Connection:
        """The verdict connection: autocommit (explicit BEGIN IMMEDIATE), short busy timeout, authorizer on."""
        conn = sqlite3.connect(str(self.path), timeout=VERDICT_BUSY_MS / 1000, isolation_level=None)
        conn.set_authorizer(_only_insert_reviews)
        return conn

    def add(self, result_id: int, verdict: dict[str, Any]) -> int:
        try:
            conn = self.connect()
        except sqlite3.Error as e:
            raise StoreError(f"cannot open the database {self.path} to store the verdict ({e})") from None
        try:
            conn.execute(f"PRAGMA busy_timeout = {VERDICT_BUSY_MS}")
            conn.execute("PRAGMA foreign_keys = ON")
            conn.execute("BEGIN IMMEDIATE")
            try:
                row = conn.execute("SELECT sha256 FROM results WHERE id = ?", (result_id,)).fetchone()
                if row is None:
                    raise VerdictError({"result": f"there is no result #{result_id}"})
                cur = conn.execute(
                    "INSERT INTO reviews (result_id, result_sha256, reviewed_at, reviewer, agree, diagnosis, action, "
                    "histopathology, note) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (result_id, row[0], now_iso(), db_text(verdict["reviewer"]), verdict["agree"],
                     verdict["diagnosis"], verdict["action"], db_text(verdict["histopathology"]),
                     db_text(verdict["note"])))
                conn.execute("COMMIT")
                return int(cur.lastrowid or 0)
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
        except sqlite3.OperationalError as e:
            text = str(e).lower()
            if "locked" in text or "busy" in text:
                raise DatabaseBusy(str(e)) from None
            raise StoreError(f"the verdict could not be stored in {self.path} ({e}); check the database is "
                             "writable by the review app's user") from None
        finally:
            conn.close()


__all__ = ["ACTIONS", "DatabaseBusy", "Filters", "Page", "ReviewWriter", "VerdictError", "QUALITY_WORDS",
           "REASON_WORDS", "counts", "ensure_schema", "export_rows", "neighbours", "open_read", "parse_verdict",
           "result", "worklist"]
