"""`edge-agent status`: what the database says, checked against what the disk and the inbox show now.

Kept out of cli.py (a thin skin). The inbox is listed here, not only counted: "2 file(s) waiting" is
no use to an administrator who has to decide whether to wait, re-send or look for a broken copy, so
each waiting file is named (up to a limit) with how long ago it last changed and why it waits. The
why comes from what the agent posted (files that looked incomplete: it waits partial_timeout for the
rest) and, for the others, from what anyone can see: a temporary upload name, a file still changing,
an agent that is not running to take it.
"""
from __future__ import annotations

import json
import os
import sqlite3
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from .intake import name_kind
from .store import status as db_status

FALLBACK_WARN_FRACTION = 0.05
HEARTBEAT_SECONDS = 30
SHOW_WAITING = 10  # files named in the text output (JSON lists up to LIST_WAITING)
LIST_WAITING = 100
INCOMPLETE = {"empty": "empty file", "truncated": "truncated file"}


@dataclass
class Waiting:
    """One file in the inbox without an outcome yet."""

    file: str          # inbox-relative
    age_seconds: float  # since it last changed (mtime or ctime)
    why: str


@dataclass
class Inbox:
    images: int                 # image files waiting (what `backlog` has always counted)
    uploads: int                # temp-named files (.part, .tmp, ...) waiting for their rename
    files: list[Waiting]        # oldest change first, at most LIST_WAITING


def _num(agent: dict[str, Any], key: str, default: float) -> float:
    try:
        return float(agent.get(key) or default)
    except ValueError:
        return default


def _why(rel: str, age: float, agent: dict[str, Any], posted: dict[str, str], running: bool) -> str:
    quiet = _num(agent, "quiet_seconds", 2.0)
    timeout = _num(agent, "partial_timeout_seconds", 600.0)
    left = max(0.0, timeout - age)
    if name_kind(Path(rel).name) == "temp":
        return (f"temporary upload name: taken once renamed to its final name; quarantined as abandoned if "
                f"unchanged for {timeout:.0f} s ({left:.0f} s from now)")
    if rel in posted:
        what = INCOMPLETE.get(posted[rel], posted[rel])
        return (f"looks incomplete ({what}), possibly still being copied: screened when the rest arrives, "
                f"quarantined if unchanged for {timeout:.0f} s ({left:.0f} s from now)")
    if age < quiet:
        return f"still being written (changed {age:.0f} s ago): taken once quiet for {quiet:g} s"
    if running:
        return "queued: the agent takes it next"
    return "the agent is not running: start it (systemctl start edge-agent) or run `edge-agent scan`"


def inbox_waiting(agent: dict[str, Any], running: bool) -> Inbox | None:
    """Files waiting in the inbox right now, or None if it cannot be read (another user's 0700 folder)."""
    inbox = agent.get("inbox", "")
    if not inbox or not os.path.isdir(inbox):
        return None
    ex = [os.path.abspath(p) for p in (agent.get("processed_dir", ""), agent.get("quarantine_dir", "")) if p]
    try:
        posted = {w["file"]: str(w["why"]) for w in json.loads(agent.get("waiting") or "[]")}
    except (ValueError, TypeError, KeyError):
        posted = {}
    now = time.time()
    images = uploads = 0
    found: list[tuple[str, float]] = []
    for dirpath, dirnames, filenames in os.walk(inbox, onerror=lambda e: None):
        dirnames[:] = [d for d in dirnames if not d.startswith(".") and os.path.join(dirpath, d) not in ex]
        for f in filenames:
            kind = name_kind(f)
            if kind == "hidden":
                continue
            images += kind == "image"
            uploads += kind == "temp"
            path = os.path.join(dirpath, f)
            try:
                s = os.lstat(path)
            except OSError:
                continue
            found.append((os.path.relpath(path, inbox), max(0.0, now - max(s.st_mtime, s.st_ctime))))
    found.sort(key=lambda x: -x[1])
    files = [Waiting(rel, round(age, 1), _why(rel, age, agent, posted, running)) for rel, age in found[:LIST_WAITING]]
    return Inbox(images, uploads, files)


def disk_warnings(agent: dict[str, Any], db_path: Path) -> list[str]:
    """Free space and read-only mounts of the folders the agent writes, measured now: a full disk cannot be
    recorded in a database that lives on it, so `status` looks for itself."""
    need = max(_num(agent, "min_free_mb", 0), 1.0)
    out: list[str] = []
    seen: set[int] = set()
    for label, path in (("database", str(db_path.parent)), ("inbox", agent.get("inbox", "")),
                        ("processed", agent.get("processed_dir", "")), ("quarantine", agent.get("quarantine_dir", ""))):
        try:
            if not path or not os.path.isdir(path):
                continue
            fs = os.statvfs(path)
            dev = os.stat(path).st_dev
        except OSError:
            continue
        free_mb = fs.f_bavail * fs.f_frsize / 2**20
        if fs.f_flag & os.ST_RDONLY:
            out.append(f"the {label} folder {path} is on a read-only file system: the agent cannot record or move "
                       "files there until it is writable again")
        elif free_mb < need and dev not in seen:
            out.append(f"low disk space: the {label} folder {path} has {free_mb:.1f} MiB free (the agent pauses "
                       f"intake below min_free_mb {need:.0f}); free some space - it resumes by itself")
        seen.add(dev)
    return out


def pid_alive(pid: str | None) -> bool:
    try:
        os.kill(int(pid or 0), 0)
        return int(pid or 0) > 0
    except (ValueError, ProcessLookupError):
        return False
    except PermissionError:
        return True


def collect(conn: sqlite3.Connection, db_path: Path) -> dict[str, Any]:
    """Everything `status` reports, with its warnings (raises sqlite3.DatabaseError for a foreign file)."""
    st = db_status(conn)
    agent = st["agent"]
    beat = st.get("agent_updated_at")
    age = None
    if beat:
        age = (datetime.now(timezone.utc) - datetime.fromisoformat(beat.replace("Z", "+00:00"))).total_seconds()
    running = bool(agent.get("mode") == "run" and not agent.get("stopped_at") and age is not None
                   and age < HEARTBEAT_SECONDS and pid_alive(agent.get("pid")))
    inbox = inbox_waiting(agent, running)
    st["running"] = running
    st["backlog"] = inbox.images if inbox is not None else int(agent.get("backlog") or 0)
    st["uploads_in_progress"] = inbox.uploads if inbox is not None else None
    st["waiting"] = [asdict(w) for w in inbox.files] if inbox is not None else None
    warnings = []
    if st["recent_results"] and st["recent_fallback_fraction"] > FALLBACK_WARN_FRACTION:
        warnings.append(f"{st['recent_fallbacks']} of the last {st['recent_results']} results "
                        f"({st['recent_fallback_fraction']:.0%}) came from the fallback model: the primary model "
                        "fails on this machine - run `edge-agent model verify` and check the logs")
    if agent.get("paused"):
        warnings.append(f"intake paused: {agent['paused']}")
    warnings += disk_warnings(agent, db_path)
    if st["files_not_moved"] and not running:
        warnings.append(f"{st['files_not_moved']} recorded file(s) were not moved out of the inbox yet; they are "
                        "finished at the next start")
    if agent.get("mode") == "run" and not running and not agent.get("stopped_at"):
        warnings.append(f"the agent is not running (no heartbeat for {HEARTBEAT_SECONDS} s and it did not stop "
                        "cleanly); check `systemctl status` / the journal")
    st["warnings"] = warnings
    ops_collect(conn, st)
    return st


def _age(seconds: float) -> str:
    s = int(seconds)
    return f"{s} s" if s < 120 else f"{s // 60} min" if s < 7200 else f"{s // 3600} h" if s < 172800 else f"{s // 86400} d"


def render(st: dict[str, Any], db_path: Path, printable: Any = str) -> list[str]:
    """The text report (warnings are printed separately, to stderr)."""
    agent = st["agent"]
    lines = [
        f"database:        {db_path} (schema v{st['schema_version']})",
        f"agent:           {'running' if st['running'] else 'not running'} (pid {agent.get('pid', '-')}, last "
        f"heartbeat {st.get('agent_updated_at') or 'never'})",
        f"model in use:    {agent.get('model_id', '-')} [{agent.get('model_variant', '-')}"
        f"{' FALLBACK' if agent.get('model_fallback_active') == '1' else ''}]",
        f"results:         {st['results']} ({st['flagged']} flagged for review: {st['high_risk']} high risk, "
        f"{st['poor_quality']} poor quality, {st['disagreements']} model disagreements)",
        f"quarantined:     {st['quarantined']}",
        f"duplicates:      {st['duplicates']}",
        f"fallbacks:       {st['fallback_results']} results from the fallback model, {st['fallback_events']} "
        "fallback events",
        f"last activity:   {st['last_activity'] or 'never'}",
        f"inbox backlog:   {st['backlog']} file(s) waiting" + (f" in {agent['inbox']}" if agent.get("inbox") else "")
        + (f", {st['uploads_in_progress']} upload(s) under a temporary name" if st.get("uploads_in_progress") else ""),
    ]
    waiting = st.get("waiting") or []
    for w in waiting[:SHOW_WAITING]:
        lines.append(f"  {printable(w['file'])} (changed {_age(w['age_seconds'])} ago): {w['why']}")
    more = st["backlog"] + (st.get("uploads_in_progress") or 0) - min(len(waiting), SHOW_WAITING)
    if waiting and more > 0:
        lines.append(f"  ... and {more} more (edge-agent status --format json lists up to {LIST_WAITING})")
    if agent.get("paused"):
        lines.append(f"paused:          {agent['paused']}")
    lines += ops_render(st)
    return lines


# --- issue 14: model swaps, retention, metrics (docs/operations.md) ---------------------------------

def _json_field(text: Any) -> Any:
    try:
        return json.loads(text) if text else None
    except (ValueError, TypeError):
        return None


def ops_collect(conn: sqlite3.Connection, st: dict[str, Any]) -> None:
    """The operations figures: where the model came from and the last reload's outcome (modelswap.py), files
    removed by retention (retention.py), and the monitoring figures the daemon posts (metrics.py: the same
    samples as its Prometheus textfile)."""
    agent = st["agent"]
    st["model_source"] = agent.get("model_source")
    st["model_swap"] = _json_field(agent.get("model_swap"))
    st["metrics"] = _json_field(agent.get("metrics"))
    have = {t: {r[1] for r in conn.execute(f"PRAGMA table_info({t})")} for t in ("results", "duplicates", "quarantine")}
    st["pruned"] = {t: conn.execute(f"SELECT count(*) FROM {t} WHERE file_state = 'pruned'").fetchone()[0]
                    for t, cols in have.items() if "pruned_at" in cols}
    swap = st["model_swap"]
    if isinstance(swap, dict) and swap.get("result") == "rejected":
        st["warnings"].append(f"the last model reload ({swap.get('at')}) was rejected: {swap.get('detail')}; fix or "
                              "roll back the active model (`edge-agent model rollback`) - the agent keeps screening "
                              "with the model it runs, but would not start with the rejected one")


def ops_render(st: dict[str, Any]) -> list[str]:
    lines = []
    if st.get("model_source"):
        lines.append(f"model from:      {st['model_source']}")
    swap = st.get("model_swap")
    if isinstance(swap, dict):
        lines.append(f"last reload:     {swap.get('result')} at {swap.get('at')}: {swap.get('detail')}")
    if st.get("pruned") and any(st["pruned"].values()):
        lines.append("pruned:          " + ", ".join(f"{n} {t}" for t, n in st["pruned"].items() if n)
                     + " (stored copies removed by retention; the rows stay)")
    m = st.get("metrics")
    if isinstance(m, dict):
        lines.append(f"metrics:         {m.get('edge_agent_images_screened_total', 0):.0f} screened, "
                     f"{m.get('edge_agent_fallback_results_total', 0):.0f} fallback results since start, backlog "
                     f"{m.get('edge_agent_backlog', 0):.0f}, paused {m.get('edge_agent_paused', 0):.0f}")
    return lines
