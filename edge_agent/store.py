"""The results database: one SQLite file a clinician can open with sqlite3 or datasette.

One row per image in exactly one of `results`, `duplicates` or `quarantine`,
keyed by content (sha256). Each row carries `file_state`, the state of the
inbox file it came from: 'pending' means the row is committed but the file
has not been moved yet, so after a crash the agent finishes the move instead
of recording the image twice; 'replaced' means the inbox file was overwritten
with other content while it was being screened (the row stands for the earlier
content; the new content gets its own row). File names that are not valid
UTF-8 are stored with backslash escapes (db_text/fs_path). WAL lets the CLI and datasette read while the
single writer thread commits; synchronous=FULL makes a commit durable before
the file it describes leaves the inbox. All SQL takes parameters; the only
identifiers built from data are `p_<label>` columns, and labels are validated
as plain identifiers when the bundle is verified.
"""
from __future__ import annotations

import json
import logging
import os
import re
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from .bundle import LABEL_RE
from .share import Share

SCHEMA_VERSION = 6
# PRAGMA application_id of an edge-agent database ("EdAg"): tells ours from any other SQLite file. Databases
# created before it was set have 0 and are recognised by their tables instead.
APPLICATION_ID = 0x45644167
OUR_TABLES = ("results", "duplicates", "quarantine", "events", "agent_state", "schema_version")
TABLES = ("results", "duplicates", "quarantine")
FILE_STATES = ("pending", "moved", "deleted", "kept", "missing", "replaced", "pruned")
BUSY_TIMEOUT_MS = 10_000
WRITER_BUSY_TIMEOUT_MS = 2_000  # the writer gives up a lock wait sooner, to say in the log what it waits for
LOCK_LOG_SECONDS = 30.0

log = logging.getLogger(__name__)


class StoreError(RuntimeError):
    """The database cannot be opened or is from a newer agent; the message says what to do."""


def is_locked(e: BaseException) -> bool:
    """SQLITE_BUSY/SQLITE_LOCKED: another connection holds the lock we need."""
    text = str(e).lower()
    return isinstance(e, sqlite3.OperationalError) and ("locked" in text or "busy" in text)


def describe_db_error(path: Path, e: BaseException) -> str:
    """What a failed database write means, for the log and `status`, in words a person can act on."""
    text = str(e).lower()
    if is_locked(e):
        return (f"the database {path} is locked by another process that holds a write transaction open (an "
                "sqlite3 shell, a backup or a script?); waiting for it to commit or close - nothing is lost "
                "meanwhile")
    if "full" in text:
        return f"the disk holding the database {path} is full ({e}); free some space - the agent resumes by itself"
    if "readonly" in text or "read-only" in text:
        return f"the database {path} cannot be written ({e}); make it and its folder writable by the agent"
    return f"cannot write to the database {path} ({e}); check the disk and the file's permissions"


def damaged(path: Path, e: BaseException, conn: sqlite3.Connection | None = None) -> str:
    """What a database that fails with a non-transient error means: damaged pages (with what SQLite's
    quick_check says), or a file that is not a database; in words a person can act on."""
    detail = ""
    if conn is not None:
        detail = integrity_problem(conn) or ""
    else:
        try:
            c = sqlite3.connect(f"{Path(path).resolve().as_uri()}?mode=ro", uri=True, timeout=1)
            try:
                detail = integrity_problem(c) or ""
            finally:
                c.close()
        except sqlite3.Error as e2:
            detail = str(e2)
    found = f"; quick_check: {detail}" if detail and detail != str(e) else ""
    return (f"the database {path} is damaged or not a database ({e}{found}); screening stopped so that no image "
            "is recorded wrongly - the images stay in the inbox. Stop the agent, move the database aside (keep it "
            "for recovery with `sqlite3 FILE .recover`), restore it from a backup or let the agent start a new one")


def integrity_problem(conn: sqlite3.Connection) -> str | None:
    """None when SQLite's quick_check passes, else its first findings (or the error it fails with)."""
    try:
        rows = [r[0] for r in conn.execute("PRAGMA quick_check(5)")]
    except sqlite3.Error as e:
        return str(e)
    return None if rows == ["ok"] else "; ".join(str(r) for r in rows)


def is_transient(e: BaseException) -> bool:
    """Errors worth waiting out (locked, disk full, read-only, I/O): the database itself is not at fault.
    SQLITE_CORRUPT and SQLITE_NOTADB ("malformed", "not a database") are not."""
    if not isinstance(e, sqlite3.OperationalError):
        return False
    text = str(e).lower()
    return "malformed" not in text and "not a database" not in text


def file_identity(path: Path) -> tuple[int, int] | None:
    try:
        s = os.stat(path)
    except OSError:
        return None
    return (s.st_dev, s.st_ino)


def now_iso() -> str:
    """UTC timestamp with a fixed width, so text comparison is time comparison."""
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def to_iso(dt: datetime) -> str:
    return dt.astimezone(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def db_text(value: str) -> str:
    """Text SQLite can store: file names may hold bytes that are not UTF-8 (Python keeps them as lone
    surrogates), which sqlite3 refuses to encode. They are written as backslash escapes (b'\\xff' ->
    '\\xff'), readable by a person; valid names are unchanged."""
    try:
        value.encode("utf-8")
        return value
    except UnicodeEncodeError:
        return value.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


_ESCAPED_BYTE = re.compile(r"\\x([89a-f][0-9a-f])")


def db_path(path: str | os.PathLike[str] | None) -> str | None:
    """A file system path as stored in the database (see db_text); `fs_path` turns it back."""
    return None if path is None else db_text(os.fspath(path))


def fs_path(text: str | None) -> str | None:
    """The file system path a db_path() value stands for (undoes the escapes of undecodable bytes)."""
    if text is None or "\\x" not in text:
        return text
    # A valid UTF-8 name that literally contains "\\x80".."\\xff" would be misread; such names do not occur
    # in practice, while names with undecodable bytes do (copied from old Windows/FAT media).
    return _ESCAPED_BYTE.sub(lambda m: chr(0xDC00 + int(m.group(1), 16)), text)


def _create_private(path: Path, share: Share | None = None) -> None:
    """Create the database file 0600 (and its folder 0700 if new): it holds patient-derived data. With a
    share group (share.py): 0640 and 0750, with that group."""
    share = share or Share()
    if not path.parent.exists():
        share.make_dirs(path.parent)
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, share.file_mode)
    except FileExistsError:
        return
    try:
        share.fix_fd(fd, directory=False)
    finally:
        os.close(fd)


def no_access(path: Path, e: OSError | None = None) -> str:
    """Why a person may not read the results, and what to do about it."""
    why = f" ({e.strerror})" if e is not None and e.strerror else ""
    return (f"you may not read the database {path}{why}: results are readable only by the agent's user and the group "
            "named by its share_group setting; ask the administrator to add you to that group (docs/install.md, "
            "'Staff access to results'), then log in again")


def _open_readonly(path: Path) -> sqlite3.Connection:
    """A read-only connection. A WAL database nobody has open has no -wal/-shm files (everything is in the
    main file), and a reader who may not write the folder (staff in the share group) cannot create the -shm
    SQLite needs: then the file is read as it is (immutable=1). Safe because the agent writes new rows into
    the -wal, never straight into the main file, and copies them back only in a checkpoint of 1,000 pages."""
    uri = path.resolve().as_uri()
    conn = sqlite3.connect(f"{uri}?mode=ro", uri=True, timeout=BUSY_TIMEOUT_MS / 1000, check_same_thread=False)
    try:
        conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
        return conn
    except sqlite3.OperationalError as e:
        text = str(e).lower()
        if not ("readonly" in text or "unable to open" in text) or os.path.exists(f"{path}-wal"):
            return conn  # the caller's first query reports it, with its usual message
        conn.close()
    return sqlite3.connect(f"{uri}?mode=ro&immutable=1", uri=True, timeout=BUSY_TIMEOUT_MS / 1000,
                           check_same_thread=False)


def connect(path: Path, readonly: bool = False, share: Share | None = None) -> sqlite3.Connection:
    """Open the database with the agent's pragmas; read-only connections never create it."""
    try:
        if path.is_dir():
            raise StoreError(f"the database path {path} is a folder; pass the database file's path, e.g. "
                             f"{path / 'results.db'}")
        found = path.exists()
    except PermissionError as e:
        raise StoreError(no_access(path, e)) from None
    try:
        if readonly:
            if not found:
                raise StoreError(f"no database at {path}: run `edge-agent run` or `edge-agent scan` first, or pass "
                                 "the right --db")
            if not os.access(path, os.R_OK):
                raise StoreError(no_access(path))
            conn = _open_readonly(path)
        else:
            try:
                _create_private(path, share)
            except OSError as e:
                raise StoreError(f"cannot create the database {path} ({e}); check the folder exists and is writable "
                                 "by the agent's user") from None
            conn = sqlite3.connect(str(path), timeout=BUSY_TIMEOUT_MS / 1000, check_same_thread=False)
    except sqlite3.Error as e:
        raise StoreError(f"cannot open the database {path} ({e}); check the file and its folder can be read (and "
                         "written) by the agent's user") from None
    conn.row_factory = sqlite3.Row
    try:
        conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        check_ours(conn, path)  # before anything is changed (journal mode, schema): never touch a foreign file
        if not readonly:
            _check_writable(conn, path)
            mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if mode.lower() != "wal":
                raise StoreError(f"{path} cannot use WAL journaling (got {mode}); put the database on a local disk")
            conn.execute("PRAGMA synchronous = FULL")
            conn.execute("PRAGMA foreign_keys = ON")
    except sqlite3.DatabaseError as e:
        conn.close()
        raise StoreError(f"{path} is not a usable SQLite database ({e}); move it away or pass another --db") from None
    except BaseException:
        conn.close()
        raise
    return conn


def _check_writable(conn: sqlite3.Connection, path: Path) -> None:
    """Fail at start, with the cause, when the database cannot be written (a read-only file, folder or
    mount): a one-shot scan must not retry for minutes and a daemon must not start half-working. A write
    lock held by another process is not a failure here: the writer waits for it and says so."""
    conn.execute("PRAGMA busy_timeout = 0")
    try:
        version = int(conn.execute("PRAGMA user_version").fetchone()[0])
        conn.execute("BEGIN IMMEDIATE")
        try:
            conn.execute(f"PRAGMA user_version = {int(version)}")  # a real write (a read-only file takes BEGIN fine)
        finally:
            conn.execute("ROLLBACK")
    except sqlite3.OperationalError as e:
        if is_locked(e) and "readonly" not in str(e).lower():
            return
        text = str(e).lower()
        if "readonly" in text or "read-only" in text or "unable to open" in text or "disk i/o" in text:
            raise StoreError(f"the database {path} cannot be written ({e}); make the file and its folder writable "
                             "by the agent's user (and the file system read-write), or pass another --db") from None
        raise
    finally:
        conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")


def check_ours(conn: sqlite3.Connection, path: Path) -> None:
    """StoreError unless the file is an edge-agent database (or a new, empty one)."""
    app = conn.execute("PRAGMA application_id").fetchone()[0]
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    if app not in (0, APPLICATION_ID):
        raise StoreError(f"{path} is an SQLite database of another program (application_id {app:#x}), not an "
                         "edge-agent results database; it was not modified - pass the --db the agent writes to")
    if version == 0 and app == 0 and not tables:
        return  # new and empty: ours to create
    missing = [t for t in OUR_TABLES if t not in tables]
    if version == 0 or missing:
        have = ", ".join(sorted(tables)[:8]) or "no tables"
        raise StoreError(f"{path} is not an edge-agent results database (user_version {version}, tables: {have}; "
                         f"missing {', '.join(missing) or 'the schema version'}); it was not modified - pass the "
                         "--db the agent writes to, or a path where a new database can be created")


# --- schema -----------------------------------------------------------------

def _migration_1(db: Any) -> None:
    """Initial schema: results, duplicates, quarantine, events, agent_state."""
    db["results"].create({
        "id": int, "sha256": str, "original_name": str, "original_path": str, "stored_path": str, "file_state": str,
        "received_at": str, "processed_at": str, "model_id": str, "model_variant": str, "fallback": int,
        "label": str, "label_name": str, "confidence": float, "p_high_risk": float, "probabilities": str,
        "needs_review": int, "review_reasons": str, "high_risk_rules": str, "quality_issues": str,
        "sharpness": float, "brightness": float, "clipped_dark": float, "clipped_bright": float,
        "image_format": str, "width": int, "height": int, "decode_reduction": int,
        "spot_checked": int, "spot_label": str, "latency_ms": float,
    }, pk="id", not_null=["sha256", "original_name", "original_path", "file_state", "received_at", "processed_at",
                          "model_id", "model_variant", "fallback", "label", "confidence", "probabilities",
                          "needs_review", "review_reasons"],
        defaults={"fallback": 0, "needs_review": 0, "review_reasons": "", "spot_checked": 0}, if_not_exists=True)
    db["duplicates"].create({
        "id": int, "sha256": str, "result_id": int, "original_name": str, "original_path": str, "stored_path": str,
        "file_state": str, "received_at": str, "recorded_at": str,
    }, pk="id", foreign_keys=[("result_id", "results", "id")],
        not_null=["sha256", "result_id", "original_name", "original_path", "file_state", "received_at", "recorded_at"],
        if_not_exists=True)
    db["quarantine"].create({
        "id": int, "sha256": str, "original_name": str, "original_path": str, "stored_path": str, "file_state": str,
        "reason_code": str, "reason": str, "size_bytes": int, "received_at": str, "quarantined_at": str,
    }, pk="id", not_null=["original_name", "original_path", "file_state", "reason_code", "reason", "received_at",
                          "quarantined_at"], if_not_exists=True)
    db["events"].create({"id": int, "at": str, "kind": str, "detail": str}, pk="id", not_null=["at", "kind"],
                        if_not_exists=True)
    db["agent_state"].create({"key": str, "value": str, "updated_at": str}, pk="key", if_not_exists=True)
    db["schema_version"].create({"version": int, "applied_at": str, "description": str}, pk="version",
                                if_not_exists=True)
    for table, cols, unique in (("results", ["sha256"], True), ("results", ["processed_at"], False),
                                ("results", ["needs_review", "processed_at"], False), ("results", ["label"], False),
                                ("results", ["original_path"], False), ("duplicates", ["sha256"], False),
                                ("duplicates", ["original_path"], False), ("quarantine", ["original_path"], False),
                                ("quarantine", ["quarantined_at"], False), ("events", ["kind", "at"], False)):
        db[table].create_index(cols, unique=unique, if_not_exists=True)


def _migration_2(db: Any) -> None:
    """Provenance of each result (provenance.py): `manifest_sha256`, the SHA-256 of the signed manifest.json the
    result was produced with, and `policy`, the thresholds in force as compact JSON (Policy.to_json). Rows from
    before this migration keep NULL: what they were produced with was not recorded."""
    have = {r[1] for r in db.conn.execute("PRAGMA table_info(results)")}
    if "manifest_sha256" not in have:
        db.conn.execute("ALTER TABLE results ADD COLUMN manifest_sha256 TEXT")
    if "policy" not in have:
        db.conn.execute("ALTER TABLE results ADD COLUMN policy TEXT")


def _migration_ood(db: Any) -> None:
    """`ood_score` of each result (ood.py): how unlike the training images its features were. NULL for rows from
    before this migration and for rows produced by bundles without OOD statistics (format < 3)."""
    have = {r[1] for r in db.conn.execute("PRAGMA table_info(results)")}
    if "ood_score" not in have:
        db.conn.execute("ALTER TABLE results ADD COLUMN ood_score REAL")


def _migration_retention(db: Any) -> None:
    """Retention (retention.py): `pruned_at` on results, duplicates and quarantine, the time the stored copy was
    removed by pruning (file_state 'pruned'). The rows themselves stay: they are the record."""
    for table in TABLES:
        have = {r[1] for r in db.conn.execute(f"PRAGMA table_info({table})")}
        if "pruned_at" not in have:
            db.conn.execute(f"ALTER TABLE {table} ADD COLUMN pruned_at TEXT")


def _migration_site_calibration(db: Any) -> None:
    """Site calibration and drift alarms (site_calibration.py, drift.py): `results.calibration_id`, the site
    calibration file a result was produced under (NULL: the bundle's own temperature and thresholds), and
    `daily_figures`, one row per UTC day of the figures the drift alarms watch (kept by the daemon)."""
    have = {r[1] for r in db.conn.execute("PRAGMA table_info(results)")}
    if "calibration_id" not in have:
        db.conn.execute("ALTER TABLE results ADD COLUMN calibration_id TEXT")
    db.conn.execute("""CREATE TABLE IF NOT EXISTS daily_figures (
        day TEXT PRIMARY KEY,           -- UTC date, YYYY-MM-DD
        images INTEGER NOT NULL,        -- results that day
        quarantined INTEGER NOT NULL,   -- files quarantined that day
        poor_quality INTEGER NOT NULL,  -- results flagged poor_quality
        flagged INTEGER NOT NULL,       -- results needing review
        ood INTEGER NOT NULL,           -- results flagged out_of_distribution
        mean_ood_score REAL,            -- NULL when no result carries an OOD score
        rule_flags TEXT NOT NULL,       -- JSON {rule: results that rule flagged}
        class_mix TEXT NOT NULL,        -- JSON {label: results with that top label}
        updated_at TEXT NOT NULL)""")


# The worklist order of the review app (review/db.py): cases needing review first, then by calibrated
# P(malignant), then newest id. An index on exactly these expressions lets keyset paging read one page
# (LIMIT n) instead of sorting every row: constant time per page at 100,000 results.
WORKLIST_INDEX_SQL = ("CREATE INDEX IF NOT EXISTS idx_results_worklist ON results "
                      "(needs_review, coalesce(p_high_risk, -1.0), id)")


def _migration_reviews(db: Any) -> None:
    """Clinician reviews (review app, docs/review.md): an append-only `reviews` table - a verdict is never
    changed or deleted, a later one supersedes it - `latest_reviews` (the newest review of each result) and
    `results_reviewed` (every result with its latest verdict, NULL when not reviewed). `results` is not
    changed. Triggers refuse UPDATE and DELETE on reviews, so the audit trail holds even for a tool that
    writes SQL directly."""
    conn = db.conn
    conn.execute("""CREATE TABLE IF NOT EXISTS reviews (
        id INTEGER PRIMARY KEY,
        result_id INTEGER NOT NULL REFERENCES results(id),
        result_sha256 TEXT NOT NULL,
        reviewed_at TEXT NOT NULL,
        reviewer TEXT NOT NULL,
        agree INTEGER NOT NULL CHECK (agree IN (0, 1)),
        diagnosis TEXT NOT NULL,
        action TEXT NOT NULL CHECK (action IN ('none', 'follow_up', 'excise', 'refer')),
        histopathology TEXT NOT NULL DEFAULT '',
        note TEXT NOT NULL DEFAULT '')""")
    conn.execute("CREATE INDEX IF NOT EXISTS idx_reviews_result ON reviews (result_id, id)")
    conn.execute("CREATE TRIGGER IF NOT EXISTS reviews_no_update BEFORE UPDATE ON reviews "
                 "BEGIN SELECT RAISE(ABORT, 'reviews are append-only: add a new review instead'); END")
    conn.execute("CREATE TRIGGER IF NOT EXISTS reviews_no_delete BEFORE DELETE ON reviews "
                 "BEGIN SELECT RAISE(ABORT, 'reviews are append-only: add a new review instead'); END")
    conn.execute("CREATE VIEW IF NOT EXISTS latest_reviews AS SELECT r.* FROM reviews r "
                 "WHERE r.id = (SELECT max(id) FROM reviews WHERE result_id = r.result_id)")
    conn.execute("CREATE VIEW IF NOT EXISTS results_reviewed AS SELECT res.*, lr.id AS review_id, "
                 "lr.reviewed_at, lr.reviewer, lr.agree, lr.diagnosis, lr.action, lr.histopathology, "
                 "lr.note AS review_note FROM results res LEFT JOIN latest_reviews lr ON lr.result_id = res.id")
    conn.execute(WORKLIST_INDEX_SQL)


MIGRATIONS: list[tuple[int, str, Any]] = [(1, "initial schema", _migration_1),
                                          (2, "results.manifest_sha256 and results.policy", _migration_2),
                                          (3, "results.ood_score", _migration_ood),
                                          (4, "pruned_at (retention)", _migration_retention),
                                          (5, "results.calibration_id and daily_figures", _migration_site_calibration),
                                          (6, "reviews (append-only), latest_reviews, results_reviewed, worklist "
                                              "index", _migration_reviews)]


def migrate(conn: sqlite3.Connection, labels: Sequence[str] = ()) -> None:
    """Bring the schema to SCHEMA_VERSION and make sure every label has its p_<label> column.

    Each migration is idempotent (IF NOT EXISTS), runs in a transaction and
    bumps PRAGMA user_version last, so an interrupted migration simply reruns.
    """
    current = conn.execute("PRAGMA user_version").fetchone()[0]
    if current > SCHEMA_VERSION:
        raise StoreError(f"the database schema is version {current}, newer than this agent understands "
                         f"({SCHEMA_VERSION}); upgrade edge-agent - the database was not modified")
    if current < SCHEMA_VERSION:
        import sqlite_utils  # only needed to create/migrate; keeps restarts fast

        db = sqlite_utils.Database(conn, execute_plugins=False)
        for version, description, fn in MIGRATIONS:
            if version <= current:
                continue
            with db.atomic():
                fn(db)
                conn.execute("INSERT OR REPLACE INTO schema_version (version, applied_at, description) VALUES (?, ?, ?)",
                             (version, now_iso(), description))
                conn.execute(f"PRAGMA user_version = {int(version)}")
            conn.execute(f"PRAGMA application_id = {int(APPLICATION_ID)}")
    have = {r[1] for r in conn.execute("PRAGMA table_info(results)")}
    missing = [lab for lab in labels if f"p_{lab}" not in have]
    if missing:
        import sqlite_utils

        db = sqlite_utils.Database(conn, execute_plugins=False)
        with db.atomic():
            for lab in missing:
                if not LABEL_RE.match(lab):
                    raise StoreError(f"label {lab!r} is not a plain identifier; rebuild the bundle")
                db.table("results").add_column(f"p_{lab}", float)


# --- writing (writer thread only) ---------------------------------------------

class Writer:
    """The one connection that writes. Not thread-safe by design: only the writer thread uses it."""

    def __init__(self, path: Path, labels: Sequence[str], share: Share | None = None) -> None:
        self.path = path
        self.conn = connect(path, share=share)
        try:
            migrate(self.conn, labels)
            self._share(share or Share())
            problem = integrity_problem(self.conn)
            if problem is not None:
                raise sqlite3.DatabaseError(problem)
        except sqlite3.DatabaseError as e:
            self.conn.close()
            if is_transient(e):
                raise StoreError(describe_db_error(path, e)) from None
            raise StoreError(damaged(path, e)) from None
        except BaseException:
            self.conn.close()
            raise
        if self.conn.execute("PRAGMA application_id").fetchone()[0] == 0:  # ours from before it was set
            try:
                self.conn.execute(f"PRAGMA application_id = {int(APPLICATION_ID)}")
            except sqlite3.OperationalError:  # locked by another process now: set at a later start
                pass
        # The file this connection writes to: if the path stops naming it (deleted, replaced), rows would go
        # into a file nobody can read any more, so no image may leave the inbox on their strength.
        self.identity = file_identity(path)
        self.conn.execute(f"PRAGMA busy_timeout = {int(WRITER_BUSY_TIMEOUT_MS)}")
        self.labels = tuple(labels)
        self._in_tx = False

    def _share(self, share: Share) -> None:
        """The database and its -wal/-shm files (open now, so they exist and stay while the agent runs) get the
        share group and mode: SQLite copies the database's permission bits to them, but not its group."""
        for suffix in ("", "-wal", "-shm"):
            try:
                share.fix_path(Path(f"{self.path}{suffix}"))
            except OSError as e:
                log.warning("cannot give %s%s to %s (%s); staff may not be able to read results", self.path, suffix,
                            share.describe(), e.strerror or e)

    def gone(self) -> str | None:
        """Why the database file this writer uses is no longer the one at its path, if it is not."""
        now = file_identity(self.path)
        if now == self.identity:
            return None
        what = "deleted (or moved away, or its disk is gone)" if now is None else "replaced by another file"
        return (f"the database {self.path} was {what} while the agent was using it: results written now would be "
                "lost with it, so screening stopped and the images stay in the inbox; restore the database (or "
                "leave it deleted to start a new one) and start the agent again")

    def _begin(self, lock_wait: float | None) -> None:
        """BEGIN IMMEDIATE (take the write lock now), waiting up to lock_wait seconds (None: as long as it
        takes) while another process holds it, and saying so in the log."""
        start = last_log = time.monotonic()
        while True:
            try:
                self.conn.execute("BEGIN IMMEDIATE")
                if last_log != start:
                    log.warning("got the write lock on %s after %.0f s", self.path, time.monotonic() - start)
                return
            except sqlite3.OperationalError as e:
                now = time.monotonic()
                if not is_locked(e) or (lock_wait is not None and now - start >= lock_wait):
                    raise
                if last_log == start or now - last_log >= LOCK_LOG_SECONDS:
                    last_log = now
                    log.warning("%s (waiting %.0f s so far)", describe_db_error(self.path, e), now - start)

    @contextmanager
    def transaction(self, lock_wait: float | None = None) -> Iterator[None]:
        """One write transaction; lock_wait as in _begin (0: fail after the busy timeout)."""
        self._begin(lock_wait)
        try:
            yield
        except BaseException:
            self.conn.rollback()
            raise
        else:
            self.conn.commit()

    def result_id(self, sha256: str) -> int | None:
        row = self.conn.execute("SELECT id FROM results WHERE sha256 = ?", (sha256,)).fetchone()
        return None if row is None else int(row[0])

    def insert_result(self, row: dict[str, Any]) -> int | None:
        """Insert a result; None if a result with this sha256 exists (caller records a duplicate)."""
        row = dict(row)
        probs = row.pop("probabilities")
        for lab in self.labels:
            row[f"p_{lab}"] = probs.get(lab)
        row["probabilities"] = json.dumps(probs, separators=(",", ":"))
        return self._insert("results", row, or_ignore=True)

    def insert_duplicate(self, row: dict[str, Any]) -> int:
        rid = self._insert("duplicates", row)
        assert rid is not None
        return rid

    def insert_quarantine(self, row: dict[str, Any]) -> int:
        rid = self._insert("quarantine", row)
        assert rid is not None
        return rid

    def _insert(self, table: str, row: dict[str, Any], or_ignore: bool = False) -> int | None:
        assert table in TABLES
        cols = list(row)
        sql = (f"INSERT {'OR IGNORE ' if or_ignore else ''}INTO {table} ({', '.join(cols)}) "
               f"VALUES ({', '.join('?' for _ in cols)})")
        cur = self.conn.execute(sql, [db_text(v) if isinstance(v, str) else v for v in (row[c] for c in cols)])
        return int(cur.lastrowid) if cur.rowcount == 1 and cur.lastrowid is not None else None

    def set_file_state(self, table: str, row_id: int, state: str, stored_path: str | None = None) -> None:
        assert table in TABLES and state in FILE_STATES
        if stored_path is None:
            self.conn.execute(f"UPDATE {table} SET file_state = ? WHERE id = ?", (state, row_id))
        else:
            self.conn.execute(f"UPDATE {table} SET file_state = ?, stored_path = ? WHERE id = ?",
                              (state, db_path(stored_path), row_id))

    def pending(self) -> list[dict[str, Any]]:
        """Rows whose file was not yet moved/deleted when the agent last stopped."""
        out = []
        for table in TABLES:
            for r in self.conn.execute(f"SELECT id, original_path, stored_path FROM {table} "
                                       "WHERE file_state = 'pending'"):
                out.append({"table": table, "id": r[0], "original_path": fs_path(r[1]), "stored_path": fs_path(r[2])})
        return out

    def event(self, kind: str, detail: str = "") -> None:
        self.conn.execute("INSERT INTO events (at, kind, detail) VALUES (?, ?, ?)", (now_iso(), kind, db_text(detail)))

    def set_state(self, values: dict[str, Any]) -> None:
        t = now_iso()
        self.conn.executemany(
            "INSERT INTO agent_state (key, value, updated_at) VALUES (?, ?, ?) "
            "ON CONFLICT(key) DO UPDATE SET value = excluded.value, updated_at = excluded.updated_at",
            [(k, None if v is None else db_text(str(v)), t) for k, v in values.items()])

    def close(self) -> None:
        self.conn.close()


# --- reading (any thread; one connection per thread) ------------------------------

class Reader:
    """Lookups the hashing workers need before deciding what a file is; one read connection per thread."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._local = threading.local()

    def _conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._local.conn = connect(self.path, readonly=True)
        return conn

    def result_id(self, sha256: str) -> int | None:
        row = self._conn().execute("SELECT id FROM results WHERE sha256 = ?", (sha256,)).fetchone()
        return None if row is None else int(row[0])

    def recorded(self, original_path: str | os.PathLike[str], sha256: str | None,
                 states: Iterable[str]) -> dict[str, Any] | None:
        """An existing row for this very inbox file (same path and content) in one of `states`."""
        original_path = db_path(original_path)
        states = tuple(states)
        marks = ", ".join("?" for _ in states)
        for table in TABLES:
            if sha256 is None and table != "quarantine":
                continue
            sql = (f"SELECT id, stored_path, file_state FROM {table} WHERE original_path = ? AND "
                   f"{'sha256 IS NULL' if sha256 is None else 'sha256 = ?'} AND file_state IN ({marks}) "
                   "ORDER BY id DESC LIMIT 1")
            params = (original_path, *(() if sha256 is None else (sha256,)), *states)
            row = self._conn().execute(sql, params).fetchone()
            if row is not None:
                return {"table": table, "id": row[0], "stored_path": fs_path(row[1]), "file_state": row[2]}
        return None

    def close(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None


# --- queries for the CLI ---------------------------------------------------------------

def status(conn: sqlite3.Connection, recent: int = 200) -> dict[str, Any]:
    """Counts and agent state for `edge-agent status`."""
    def one(sql: str, params: Sequence[Any] = ()) -> Any:
        return conn.execute(sql, params).fetchone()[0]

    state = {r["key"]: r["value"] for r in conn.execute("SELECT key, value FROM agent_state")}
    state_times = {r["key"]: r["updated_at"] for r in conn.execute("SELECT key, updated_at FROM agent_state")}
    recent_rows = conn.execute("SELECT fallback FROM results ORDER BY id DESC LIMIT ?", (recent,)).fetchall()
    recent_fallbacks = sum(r[0] for r in recent_rows)
    last = [one("SELECT max(processed_at) FROM results"), one("SELECT max(quarantined_at) FROM quarantine"),
            one("SELECT max(recorded_at) FROM duplicates")]
    return {
        "results": one("SELECT count(*) FROM results"),
        "flagged": one("SELECT count(*) FROM results WHERE needs_review = 1"),
        "high_risk": one("SELECT count(*) FROM results WHERE review_reasons LIKE '%high_risk%'"),
        "poor_quality": one("SELECT count(*) FROM results WHERE review_reasons LIKE '%poor_quality%'"),
        "disagreements": one("SELECT count(*) FROM results WHERE review_reasons LIKE '%model_disagreement%'"),
        "quarantined": one("SELECT count(*) FROM quarantine"),
        "duplicates": one("SELECT count(*) FROM duplicates"),
        "files_not_moved": sum(one(f"SELECT count(*) FROM {t} WHERE file_state = 'pending'") for t in TABLES),
        "last_activity": max((x for x in last if x), default=None),
        "fallback_results": one("SELECT count(*) FROM results WHERE fallback = 1"),
        "fallback_events": one("SELECT count(*) FROM events WHERE kind = 'fallback'"),
        "recent_results": len(recent_rows),
        "recent_fallbacks": recent_fallbacks,
        "recent_fallback_fraction": (recent_fallbacks / len(recent_rows)) if recent_rows else 0.0,
        "models_used": [dict(r) for r in conn.execute(
            "SELECT model_id, model_variant, count(*) AS results FROM results GROUP BY model_id, model_variant "
            "ORDER BY max(id) DESC")],
        "agent": state,
        "agent_updated_at": state_times.get("heartbeat"),
        "schema_version": one("PRAGMA user_version"),
    }
