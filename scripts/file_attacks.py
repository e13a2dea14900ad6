#!/usr/bin/env python3
"""Run every crafted file of tests/hostile_files.py through a real `edge-agent scan`, one file per scan.

    python scripts/file_attacks.py [--limit-gb 1.0] [--only SUBSTRING ...] [--code DIR] [--bundle DIR]

Each file goes alone into a fresh inbox with a fresh database; the agent runs
under RLIMIT_AS (default 1 GiB, like the unit's MemoryMax=1G; its decode
workers inherit it as their hard limit). Printed per file: the outcome (the
table and reason code of its one row), the number of outcome rows (must be 1),
the exit status, peak RSS of the agent and of its largest decode worker
(VmHWM from /proc, sampled every 20 ms until each process ends: unlike
ru_maxrss it starts afresh at exec, so the launcher's own size cannot leak into
it), wall time and CPU time of the whole scan (agent + workers, from wait4).
--code DIR runs the edge_agent package in DIR (e.g. `git archive <commit>
edge_agent | tar -x -C /tmp/old`) to compare with an older tree.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from hostile_files import ATTACKS  # noqa: E402

sys.path.insert(0, str(REPO))
from edge_agent.benchstats import child_pids, proc_kb  # noqa: E402


def run_one(name: str, data: bytes, limit: int, code: Path, bundle: Path, timeout: float) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        inbox = Path(tmp) / "inbox"
        inbox.mkdir()
        (inbox / name).write_bytes(data)
        os.utime(inbox / name, (time.time() - 3600, time.time() - 3600))  # a finished copy, an hour old
        env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENCV_IO_", "ORT_", "EDGE_AGENT_"))}
        env["PYTHONPATH"] = str(code)
        # files that look incomplete (empty, truncated) and are older than this get their outcome at once
        env["EDGE_AGENT_PARTIAL_TIMEOUT_SECONDS"] = "1"
        cmd = [sys.executable, "-m", "edge_agent", "scan", "--inbox", str(inbox), "--db", f"{tmp}/r.db", "--model",
               str(bundle), "--workers", "2", "--threads", "1"]
        t0 = time.monotonic()
        p = subprocess.Popen(cmd, env=env, cwd=tmp, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             preexec_fn=(lambda: resource.setrlimit(resource.RLIMIT_AS, (limit, limit)))
                             if limit else None)
        peaks: dict[int, int] = {}
        done = threading.Event()

        def sample() -> None:
            while not done.is_set():
                for pid in [p.pid, *child_pids(p.pid)]:
                    peaks[pid] = max(peaks.get(pid, 0), proc_kb("VmHWM:", pid))
                time.sleep(0.02)

        th = threading.Thread(target=sample, daemon=True)
        th.start()
        out_chunks: list[bytes] = []
        reader = threading.Thread(target=lambda: out_chunks.append(p.stdout.read()), daemon=True)
        reader.start()
        try:
            _, status, usage = _wait4(p.pid, timeout)
        except TimeoutError:
            p.kill()
            _, status, usage = os.wait4(p.pid, 0)
        wall = time.monotonic() - t0
        done.set()
        th.join()
        reader.join(5)
        rows = []
        try:
            db = sqlite3.connect(f"{tmp}/r.db")
            for t, col in (("results", "'result'"), ("quarantine", "reason_code"), ("duplicates", "'duplicate'")):
                rows += [(t, r[0], r[1] if len(r) > 1 else "") for r in db.execute(
                    f"SELECT {col}, {'reason' if t == 'quarantine' else 'original_name'} FROM {t}")]
        except sqlite3.Error as e:
            rows = [("db", str(e), "")]
        left = [p.name for p in inbox.iterdir()]
        agent_mb = peaks.get(p.pid, 0) / 1024
        worker_mb = max([v for k, v in peaks.items() if k != p.pid] or [0]) / 1024
        return {"name": name, "bytes": len(data), "exit": os.waitstatus_to_exitcode(status),
                "outcome": [f"{t}:{c}" for t, c, _ in rows], "reason": rows[0][2][:160] if rows else "",
                "left_in_inbox": left, "agent_mb": round(agent_mb), "worker_mb": round(worker_mb),
                "wall_s": round(wall, 1), "cpu_s": round(usage.ru_utime + usage.ru_stime, 1),
                "tail": b"".join(out_chunks).decode(errors="replace")[-400:]}


def _wait4(pid: int, timeout: float):
    deadline = time.monotonic() + timeout
    while True:
        r = os.wait4(pid, os.WNOHANG)
        if r[0]:
            return r
        if time.monotonic() > deadline:
            raise TimeoutError
        time.sleep(0.05)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--limit-gb", type=float, default=1.0)
    ap.add_argument("--only", nargs="*", default=[])
    ap.add_argument("--code", type=Path, default=REPO)
    ap.add_argument("--bundle", type=Path, default=REPO / "edge_agent" / "bundle")
    ap.add_argument("--timeout", type=float, default=400)
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    limit = int(a.limit_gb * 2**30)
    results = []
    for name, make, what in ATTACKS:
        if a.only and not any(s in name for s in a.only):
            continue
        r = run_one(name, make(), limit, a.code, a.bundle, a.timeout)
        r["what"] = what
        results.append(r)
        ok = len(r["outcome"]) == 1 and not r["left_in_inbox"]
        print(f"{name:30s} {r['bytes']:>10d} B  exit {r['exit']}  {','.join(r['outcome']) or '-':28s} "
              f"agent {r['agent_mb']:4d} MB worker {r['worker_mb']:4d} MB  wall {r['wall_s']:6.1f} s "
              f"cpu {r['cpu_s']:6.1f} s  {'ok' if ok else 'NOT ONE OUTCOME'}  {r['reason'][:110]}", flush=True)
    if a.json:
        a.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
