#!/usr/bin/env python3
"""Soak: many images through the real daemon (`edge-agent run`), arriving in bursts, while pruning and backups run.

    nice -n 10 python scripts/soak.py [--images 20000] [--first 1000] [--size 600x450] [--work DIR]
                                      [--report docs/proofs/soak.txt]

What it proves (issue 14, item 8): weeks of intake in an afternoon without the
daemon growing. Every image is a distinct JPEG (an example dermoscopy photo
resized to --size, its index written into a few pixels, so every file has its
own content hash); bursts of 20-400 files are moved into the inbox (written
beside it, then renamed in, as a copy tool does), with pauses, while the
daemon screens them. Between bursts, `edge-agent prune` and `edge-agent
backup` run against the live database when this installation has them (they
arrive with issue 14's items 2 and 3; without them the soak says so and runs
without). /proc is sampled every --sample-seconds for the daemon's RSS (and
its decode workers'), its open file descriptors and the outcomes so far.

It fails (exit 1) unless: every image has exactly one outcome (results,
duplicates or quarantine; nothing left in the inbox), the daemon's RSS after
the last image is within 10 % of its RSS after the first --first images, and
its open file descriptor count did not grow. The figures go to stdout and,
with --report, to a file. Wall-clock rates on a shared machine mean little;
the point is the shape of the curves.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RSS_TOLERANCE = 0.10
FD_SLACK = 0  # no growth at all: the same descriptors after the last image as after the first --first


@dataclass
class Sample:
    t: float
    outcomes: int
    written: int
    rss_kb: int
    workers_rss_kb: int
    fds: int


@dataclass
class Soak:
    args: argparse.Namespace
    samples: list[Sample] = field(default_factory=list)
    side_runs: list[str] = field(default_factory=list)
    lines: list[str] = field(default_factory=list)

    def say(self, line: str = "") -> None:
        print(line, flush=True)
        self.lines.append(line)


def agent_exe() -> list[str]:
    exe = Path(sys.executable).with_name("edge-agent")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "edge_agent"]


def has_command(name: str) -> bool:
    """Does this installation's CLI have `name` (prune/backup arrive with other items of issue 14)?"""
    r = subprocess.run([*agent_exe(), name, "--help"], capture_output=True, text=True)
    return r.returncode == 0


def proc_rss_kb(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def children(pid: int) -> list[int]:
    try:
        out = []
        for task in Path(f"/proc/{pid}/task").iterdir():
            out += [int(c) for c in (task / "children").read_text().split()]
        return out
    except OSError:
        return []


def fd_count(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return -1


def outcomes(db: Path) -> int:
    if not db.exists():
        return 0
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)
    try:
        return sum(conn.execute(f"SELECT count(*) FROM {t}").fetchone()[0]
                   for t in ("results", "duplicates", "quarantine"))
    except sqlite3.OperationalError:  # not created yet
        return 0
    finally:
        conn.close()


def make_sources(size: tuple[int, int]) -> list:
    import cv2

    srcs = [cv2.imread(str(p)) for p in sorted((REPO / "examples" / "images").glob("*.jpg"))]
    return [cv2.resize(s, size, interpolation=cv2.INTER_LINEAR) for s in srcs]


def encode(sources: list, i: int) -> bytes:
    """A distinct JPEG per index: a few pixels changed (different pixels, not only a different file) and the
    index in a comment segment (unique bytes for certain: a one-pixel change can vanish in quantisation, and
    the agent would rightly record a duplicate)."""
    import cv2

    img = sources[i % len(sources)].copy()
    img[:8, :8] = (i & 0xFF, (i >> 8) & 0xFF, (i >> 16) & 0xFF)
    data = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 90])[1].tobytes()
    note = f"soak image {i}".encode()
    return data[:2] + b"\xff\xfe" + (len(note) + 2).to_bytes(2, "big") + note + data[2:]


def run(s: Soak) -> int:
    a = s.args
    work = Path(a.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    inbox, staging, db = work / "inbox", work / "staging", work / "db" / "results.db"
    for d in (inbox, staging):
        d.mkdir(parents=True, exist_ok=True)
    if any(inbox.iterdir()) or db.exists():
        s.say(f"{work} is not empty: give --work a fresh folder")
        return 2
    w, h = (int(x) for x in a.size.split("x"))
    sources = make_sources((w, h))
    prune, backup = has_command("prune"), has_command("backup")
    s.say(f"soak: {a.images} images {w}x{h} JPEG in bursts of {a.burst_min}-{a.burst_max}, "
          f"work folder {work}")
    s.say(f"prune: {'runs between bursts' if prune else 'NOT RUN: this installation has no `edge-agent prune`'}; "
          f"backup: {'runs between bursts' if backup else 'NOT RUN: this installation has no `edge-agent backup`'}")
    log = open(work / "agent.log", "wb")
    cmd = [*agent_exe(), "run", "--inbox", str(inbox), "--db", str(db), "--after", "move",
           "--quiet-seconds", "0.5", "--workers", str(a.workers), "--threads", str(a.threads),
           "--log-level", "WARNING",
           # retention inside the daemon as well: screened images older than ~2 minutes are pruned every 30 s
           *(["--keep-processed-days", str(a.keep_minutes / 1440), "--prune-seconds", "30"] if prune else [])]
    s.say("daemon: " + " ".join(cmd))
    agent = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    rng = random.Random(a.seed)
    t0 = time.monotonic()
    written = 0
    first_ref: Sample | None = None
    last_sample = 0.0
    next_side = a.side_every

    def sample() -> Sample:
        kids = children(agent.pid)
        smp = Sample(round(time.monotonic() - t0, 1), outcomes(db), written, proc_rss_kb(agent.pid),
                     sum(proc_rss_kb(k) for k in kids), fd_count(agent.pid))
        s.samples.append(smp)
        return smp

    def side_jobs() -> None:
        for name, argv in (("prune", [*agent_exe(), "prune", "--db", str(db), "--inbox", str(inbox),
                                      "--keep-processed-days", str(a.keep_minutes / 1440)] if prune else None),
                           ("backup", [*agent_exe(), "backup", "--db", str(db), "--to",
                                       str(work / "backup.db")] if backup else None)):
            if argv is None:
                continue
            r = subprocess.run(argv, capture_output=True, text=True, timeout=600)
            s.side_runs.append(f"{name} at {written} written: exit {r.returncode} "
                               f"{(r.stdout + r.stderr).strip().splitlines()[-1:] if r.returncode else ''}")

    try:
        while written < a.images or outcomes(db) < a.images:
            if agent.poll() is not None:
                s.say(f"the daemon exited with status {agent.returncode}: see {work / 'agent.log'}")
                return 1
            done = outcomes(db)
            if written < a.images and written - done < a.max_backlog:
                n = min(rng.randint(a.burst_min, a.burst_max), a.images - written)
                for _ in range(n):
                    name = f"img_{written:06d}.jpg"
                    (staging / name).write_bytes(encode(sources, written))
                    os.replace(staging / name, inbox / name)
                    written += 1
                if written >= next_side:
                    side_jobs()
                    next_side += a.side_every
                time.sleep(rng.uniform(0, a.pause_max))
            else:
                time.sleep(0.5)
            now = time.monotonic()
            if first_ref is None and done >= a.first:
                first_ref = sample()
                last_sample = now
            elif now - last_sample >= a.sample_seconds:
                sample()
                last_sample = now
            if now - t0 > a.timeout:
                s.say(f"gave up after {a.timeout:.0f} s with {done} of {a.images} outcomes")
                return 1
        time.sleep(2)  # the last batch's moves and commit settle
        end = sample()
    finally:
        if agent.poll() is None:
            agent.send_signal(signal.SIGTERM)
            try:
                agent.wait(timeout=60)
            except subprocess.TimeoutExpired:
                agent.kill()
                agent.wait()
        log.close()
    return report(s, db, inbox, first_ref, end)


def report(s: Soak, db: Path, inbox: Path, first: Sample | None, end: Sample) -> int:
    a = s.args
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    per_table = {t: conn.execute(f"SELECT count(*) FROM {t}").fetchone()[0]
                 for t in ("results", "duplicates", "quarantine")}
    twice = conn.execute("SELECT count(*) FROM (SELECT original_name FROM (SELECT original_name FROM results "
                         "UNION ALL SELECT original_name FROM duplicates UNION ALL SELECT original_name FROM "
                         "quarantine) GROUP BY original_name HAVING count(*) > 1)").fetchone()[0]
    names = {r[0] for t in per_table for r in conn.execute(f"SELECT original_name FROM {t}")}
    pruned = conn.execute("SELECT count(*) FROM results WHERE file_state = 'pruned'").fetchone()[0]
    conn.close()
    left = sorted(p.name for p in inbox.iterdir())
    missing = a.images - len(names & {f"img_{i:06d}.jpg" for i in range(a.images)})
    s.say("")
    s.say(f"{'t (s)':>8} {'written':>8} {'outcomes':>8} {'agent RSS MB':>12} {'workers RSS MB':>14} {'fds':>5}")
    step = max(1, len(s.samples) // 40)
    for smp in s.samples[::step] + ([s.samples[-1]] if (len(s.samples) - 1) % step else []):
        s.say(f"{smp.t:8.1f} {smp.written:8d} {smp.outcomes:8d} {smp.rss_kb / 1024:12.1f} "
              f"{smp.workers_rss_kb / 1024:14.1f} {smp.fds:5d}")
    s.say("")
    s.say(f"outcomes: {per_table} for {a.images} images; names with more than one outcome: {twice}; "
          f"images without an outcome: {missing}; left in the inbox: {len(left)}; stored images pruned by "
          f"retention (rows kept): {pruned}")
    for line in s.side_runs[:3] + (["..."] if len(s.side_runs) > 6 else []) + s.side_runs[-3:] if s.side_runs \
            else ["side jobs: none ran"]:
        s.say(f"  {line}")
    ok = True
    if sum(per_table.values()) != a.images or twice or missing or left:
        s.say("FAIL: not every image has exactly one outcome")
        ok = False
    if per_table["duplicates"]:
        s.say("FAIL: distinct images were recorded as duplicates")
        ok = False
    if first is None:
        s.say("FAIL: no sample after the first images")
        return 1
    growth = (end.rss_kb - first.rss_kb) / first.rss_kb
    s.say(f"agent RSS after the first {a.first}: {first.rss_kb / 1024:.1f} MB; after the last image: "
          f"{end.rss_kb / 1024:.1f} MB ({growth:+.1%}; bar: within {RSS_TOLERANCE:.0%}); peak "
          f"{max(x.rss_kb for x in s.samples) / 1024:.1f} MB")
    s.say(f"decode workers' RSS (sum): {first.workers_rss_kb / 1024:.1f} MB -> {end.workers_rss_kb / 1024:.1f} MB")
    s.say(f"open fds after the first {a.first}: {first.fds}; after the last image: {end.fds}; "
          f"max during the run: {max(x.fds for x in s.samples)}")
    if abs(growth) > RSS_TOLERANCE:
        s.say("FAIL: RSS after the last image is not within 10 % of RSS after the first images")
        ok = False
    if end.fds > first.fds + FD_SLACK:
        s.say("FAIL: open file descriptors grew")
        ok = False
    s.say("PASS" if ok else "FAIL")
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=20_000)
    p.add_argument("--first", type=int, default=1000, help="the RSS/fd reference point (outcomes)")
    p.add_argument("--size", default="600x450")
    p.add_argument("--work", default="soak-work", help="a fresh folder (inbox, db, processed, logs)")
    p.add_argument("--burst-min", type=int, default=20)
    p.add_argument("--burst-max", type=int, default=400)
    p.add_argument("--pause-max", type=float, default=3.0, help="longest pause between bursts (s)")
    p.add_argument("--max-backlog", type=int, default=1500, help="do not let the inbox grow beyond this")
    p.add_argument("--side-every", type=int, default=2000, help="run prune and backup every N images written")
    p.add_argument("--keep-minutes", type=float, default=2.0,
                   help="retention of screened images, for the daemon's own pruning and `edge-agent prune`")
    p.add_argument("--sample-seconds", type=float, default=5.0)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=14)
    p.add_argument("--timeout", type=float, default=4 * 3600)
    p.add_argument("--report", help="also write the figures to this file")
    s = Soak(p.parse_args(argv))
    s.say(f"# scripts/soak.py {' '.join(argv if argv is not None else sys.argv[1:])}")
    s.say(f"# {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}, {os.cpu_count()} CPUs, "
          f"python {sys.version.split()[0]}")
    rc = run(s)
    if s.args.report:
        Path(s.args.report).parent.mkdir(parents=True, exist_ok=True)
        Path(s.args.report).write_text("\n".join(s.lines) + "\n")
    print(json.dumps({"exit": rc}))
    return rc


if __name__ == "__main__":
    sys.exit(main())
