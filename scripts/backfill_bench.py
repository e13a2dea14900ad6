#!/usr/bin/env python3
"""The same JPEGs through `edge-agent scan` and through `edge-agent backfill` (1 and 2 actors), side by side.

    python scripts/backfill_bench.py [--count 2000] [--sizes source,1024x768] [--actors 1,2]
                                     [--images DIR] [--workdir DIR] [--model BUNDLE] [--json FILE]

Generates `--count` distinct JPEGs per size from real dermoscopy images (/work/shared/data/ham10000/images
when present, else examples/images; 'source' keeps their size, WxH resizes them), each made unique by a
small brightness shift and a marked pixel. Then, per size, runs each command as a subprocess in its own
session and samples every process of that session from /proc every 0.2 s:

- images/s (wall): images / wall time of the whole command, start-up included (Ray's start is ~10 s here);
- images/s (pipeline): the command's own rate (scan's summary; the backfill's "this run" line), start-up
  excluded: what a long run approaches;
- CPU s/image: CPU time of every process of the command (driver, Ray's services, actors, decoders) / images;
- peak RSS per worker: each screening process with its decoder process (VmHWM): the agent's main process
  for `scan`; each Ray actor for `backfill`. Ray's own services are listed separately.

The inputs are only read (scan runs with after = "keep"). Needs the [scale] extra.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
HAM = Path("/work/shared/data/ham10000/images")
TICK = 0.2


def make_images(dest: Path, size: str, n: int, sources: list[Path]) -> Path:
    out = dest / size
    if out.is_dir() and len(list(out.glob("*.jpg"))) == n:
        return out
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    for i in range(n):
        img = cv2.imread(str(sources[i % len(sources)]))
        if size != "source":
            w, h = (int(x) for x in size.split("x"))
            img = cv2.resize(img, (w, h), interpolation=cv2.INTER_AREA if w < img.shape[1] else cv2.INTER_LINEAR)
        img = cv2.add(img, np.full_like(img, i // len(sources) % 8))
        img[0, 0] = (i % 256, i // 256 % 256, 7)
        cv2.imwrite(str(out / f"img_{i:05d}.jpg"), img, [cv2.IMWRITE_JPEG_QUALITY, 92])
    return out


def _stat(pid: str) -> tuple[int, float] | None:
    """(session id, CPU seconds) of a process."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = raw[raw.rindex(")") + 2:].split()
    tck = os.sysconf("SC_CLK_TCK")
    return int(fields[3]), (int(fields[11]) + int(fields[12])) / tck


def _hwm(pid: str) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def _cmd(pid: str) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")[:200]
    except OSError:
        return ""


def _ppid(pid: str) -> str:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
        return raw[raw.rindex(")") + 2:].split()[1]
    except OSError:
        return ""


def measure(cmd: list[str], env: dict[str, str]) -> dict[str, Any]:
    """Run cmd in its own session; sample CPU, peak RSS and roles of every process in that session."""
    t0 = time.monotonic()
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
                         text=True)
    procs: dict[str, dict[str, Any]] = {}
    import threading

    out: dict[str, str] = {}
    readers = [threading.Thread(target=lambda k, f: out.__setitem__(k, f.read()), args=(k, f), daemon=True)
               for k, f in (("stdout", p.stdout), ("stderr", p.stderr))]
    for r in readers:
        r.start()
    while True:
        done = p.poll() is not None
        # The command's processes: its session (Ray's helpers that outlive their parent stay in it) and every
        # descendant (the decoder processes start sessions of their own).
        parents: dict[str, str] = {}
        mine = {str(p.pid)} | {pid for pid in procs}
        for pid in os.listdir("/proc"):
            if pid.isdigit():
                parents[pid] = _ppid(pid)
                if (_stat(pid) or (0, 0.0))[0] == p.pid:
                    mine.add(pid)
        grew = True
        while grew:
            grew = False
            for pid, pp in parents.items():
                if pid not in mine and pp in mine:
                    mine.add(pid)
                    grew = True
        for pid in mine:
            st = _stat(pid)
            if st is None:
                continue
            rec = procs.setdefault(pid, {"cmd": _cmd(pid), "ppid": _ppid(pid), "cpu": 0.0, "hwm": 0.0})
            rec["cpu"] = max(rec["cpu"], st[1])
            rec["hwm"] = max(rec["hwm"], _hwm(pid))
            if not rec["cmd"].startswith("ray::") or "IDLE" in rec["cmd"]:
                rec["cmd"] = _cmd(pid) or rec["cmd"]  # Ray renames a worker when it becomes an actor
        if done:
            break
        time.sleep(TICK)
    wall = time.monotonic() - t0
    for r in readers:
        r.join()
    leftovers = [pid for pid in procs if pid != str(p.pid) and _stat(pid) is not None]
    for pid in leftovers:  # Ray's per-node agents can outlive the driver by a moment; ours to stop
        try:
            os.kill(int(pid), 9)
        except OSError:
            pass
    return {"rc": p.returncode, "wall": wall, "procs": procs, "stdout": out.get("stdout", ""),
            "stderr": out.get("stderr", "")}


def summarize(kind: str, m: dict[str, Any], n: int) -> dict[str, Any]:
    procs = m["procs"]
    decoders = {pid: r for pid, r in procs.items() if "edge_agent.decode_worker" in r["cmd"]}
    if kind == "scan":
        workers = [pid for pid, r in procs.items() if pid not in decoders and " scan " in f" {r['cmd']} "]
    else:
        workers = [pid for pid, r in procs.items() if "MapWorker" in r["cmd"] or "Screener" in r["cmd"]]
    per_worker = []
    for w in workers:
        dec = sum(r["hwm"] for pid, r in decoders.items() if r["ppid"] == w)
        per_worker.append(round(procs[w]["hwm"] + dec, 1))
    ray_services = sum(r["hwm"] for pid, r in procs.items() if pid not in decoders and pid not in workers
                       and (r["cmd"].startswith("ray::") or "ray/" in r["cmd"] or "gcs_server" in r["cmd"]
                            or "raylet" in r["cmd"]))
    cpu = sum(r["cpu"] for r in procs.values())
    screening_cpu = sum(procs[w]["cpu"] for w in workers) + sum(r["cpu"] for r in decoders.values())
    rate = None
    text = m["stdout"] + m["stderr"]
    hit = re.search(r"\(([\d.]+) images/s[;)]", text)
    if hit:
        rate = float(hit.group(1))
    steady = re.search(r"; ([\d.]+) images/s after start-up", text)
    return {"rc": m["rc"], "wall_s": round(m["wall"], 1), "wall_rate": round(n / m["wall"], 1),
            "pipeline_rate": rate, "steady_rate": float(steady.group(1)) if steady else rate,
            "cpu_s_per_image": round(cpu / n, 4), "screening_cpu_s_per_image": round(screening_cpu / n, 4),
            "cpu_s": round(cpu, 1),
            "peak_rss_per_worker_mb": per_worker, "ray_services_rss_mb": round(ray_services, 1),
            "processes": len(procs)}


def merge_rate(out: Path, rows: int, workdir: Path) -> dict[str, Any]:
    """Merge `rows` synthetic results (the backfill's real rows, with distinct sha256 and paths) into a fresh
    database; returns rows/s. The merge is one SQLite writer: the serial step after a cluster's run."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from edge_agent.backfill.merge import merge

    src = next((out / "outcome=result").glob("*.parquet"))
    t = pq.read_table(src)
    dest = workdir / "merge-out"
    shutil.rmtree(dest, ignore_errors=True)
    (dest / "outcome=result").mkdir(parents=True)
    shutil.copytree(out / "_backfill", dest / "_backfill")
    made, part = 0, 0
    while made < rows:
        n = min(t.num_rows, rows - made)
        chunk = t.slice(0, n)
        keys = [f"{made + i:064x}" for i in range(n)]
        chunk = chunk.set_column(chunk.schema.get_field_index("sha256"), "sha256", pa.array(keys))
        chunk = chunk.set_column(chunk.schema.get_field_index("original_path"), "original_path",
                                 pa.array([f"/archive/{k}.jpg" for k in keys]))
        pq.write_table(chunk, dest / "outcome=result" / f"part-{part:05d}.parquet")
        made, part = made + n, part + 1
    db = workdir / "merge.db"
    for f in (db, Path(f"{db}-wal"), Path(f"{db}-shm")):
        f.unlink(missing_ok=True)
    t0 = time.monotonic()
    m = merge(str(dest), db)
    first = time.monotonic() - t0
    t0 = time.monotonic()
    again = merge(str(dest), db)  # everything already there: the cost of a repeated merge
    return {"rows": rows, "merge_rows_per_s": round(m.results / first, 1),
            "remerge_rows_per_s": round(again.already / (time.monotonic() - t0), 1)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--count", type=int, default=2000)
    ap.add_argument("--sizes", default="source,1024x768")
    ap.add_argument("--actors", default="1,2")
    ap.add_argument("--images", type=Path, help="source images (default: HAM10000 in shared/, else examples/images)")
    ap.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "edge-agent-backfill-bench")
    ap.add_argument("--model", type=Path, help="bundle (default: the shipped one)")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    ap.add_argument("--merge-rows", type=int, default=20000, help="rows for the merge-rate measurement (0: skip)")
    a = ap.parse_args()
    src_dir = a.images or (HAM if HAM.is_dir() else REPO / "examples" / "images")
    sources = sorted(src_dir.glob("*.jpg"))[: max(a.count, 1)]
    if not sources:
        sys.exit(f"no .jpg images in {src_dir}")
    a.workdir.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGE_AGENT_")}
    exe = [sys.executable, "-m", "edge_agent"]
    model = ["--model", str(a.model)] if a.model else []
    table = []
    for size in a.sizes.split(","):
        imgs = make_images(a.workdir / "images", size, a.count, sources)
        runs: list[tuple[str, int, list[str]]] = []
        db = a.workdir / f"scan-{size}.db"
        for f in (db, Path(f"{db}-wal"), Path(f"{db}-shm")):
            f.unlink(missing_ok=True)
        runs.append(("scan", 2, [*exe, "scan", "--inbox", str(imgs), "--db", str(db), "--after", "keep",
                                 "--quiet-seconds", "0", "--workers", "2", "--threads", "1",
                                 "--processed-dir", str(a.workdir / "processed"),
                                 "--quarantine-dir", str(a.workdir / "quarantine"), *model]))
        for k in (int(x) for x in a.actors.split(",")):
            out = a.workdir / f"out-{size}-{k}"
            shutil.rmtree(out, ignore_errors=True)
            runs.append(("backfill", k, [*exe, "backfill", str(imgs), "-o", str(out), "--actors", str(k),
                                         "--num-cpus", str(os.cpu_count() or 2), "--no-dashboard",
                                         "--object-store-mb", "200", *model]))
        for kind, k, cmd in runs:
            print(f"[{size}] {kind} ({k} worker{'s' if k > 1 else ''}) on {a.count} images ...", file=sys.stderr,
                  flush=True)
            s = summarize(kind, measure(cmd, env), a.count)
            if s["rc"] != 0:
                print(f"  failed (exit {s['rc']})", file=sys.stderr)
            table.append({"size": size, "command": kind, "workers": k, **s})
    head = ("| size | command | worker processes | images | exit | wall s | images/s (wall, start-up incl.) | "
            "images/s (after start-up) | CPU s/image (screening processes) | CPU s/image (all, start-up incl.) | "
            "peak RSS per worker MB (+ its decoders) | Ray services RSS MB (sum) |")
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    for r in table:
        print(f"| {r['size']} | {r['command']} | {r['workers']} | {a.count} | {r['rc']} | {r['wall_s']} | "
              f"{r['wall_rate']} | {r['steady_rate']} | {r['screening_cpu_s_per_image']} | {r['cpu_s_per_image']} | "
              f"{', '.join(str(x) for x in r['peak_rss_per_worker_mb'])} | {r['ray_services_rss_mb']} |")
    merged = None
    last_out = a.workdir / f"out-{a.sizes.split(',')[-1]}-{a.actors.split(',')[-1]}"
    if a.merge_rows and (last_out / "outcome=result").is_dir():
        merged = merge_rate(last_out, a.merge_rows, a.workdir)
        print(f"\nbackfill-merge: {merged['rows']} rows into a new database at {merged['merge_rows_per_s']} rows/s; "
              f"merging them again (all already there) at {merged['remerge_rows_per_s']} rows/s")
    if a.json:
        a.json.write_text(json.dumps({"count": a.count, "cpus": os.cpu_count(), "rows": table, "merge": merged},
                                     indent=2))
    return 0 if all(r["rc"] == 0 for r in table) else 1


if __name__ == "__main__":
    sys.exit(main())
