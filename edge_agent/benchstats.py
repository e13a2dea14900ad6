"""Arithmetic and tables shared by the two benchmarks (`build-model bench`, `edge-agent bench`).

Kept tiny and dependency-free so both sides print numbers computed the same way.
"""
from __future__ import annotations

import json
import os
import resource
import sys
from typing import Any, Sequence


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile (numpy's default 'linear' method), q in [0, 100]."""
    if not values:
        return float("nan")
    v = sorted(values)
    pos = (len(v) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (pos - lo)


def latency_summary(seconds: Sequence[float], batch: int) -> dict[str, float]:
    """p50/p95/p99 in milliseconds per call, and images per second over the whole run."""
    total = sum(seconds)
    return {
        "p50_ms": 1000 * percentile(seconds, 50), "p95_ms": 1000 * percentile(seconds, 95),
        "p99_ms": 1000 * percentile(seconds, 99), "images_per_s": (batch * len(seconds) / total) if total else float("nan"),
        "iterations": len(seconds), "batch": batch,
    }


def ratio(a: float, b: float) -> float:
    """a / b, NaN when b is zero or missing (a ratio of nothing is not 0)."""
    try:
        return a / b if b else float("nan")
    except TypeError:
        return float("nan")


def proc_kb(key: str, pid: int | str = "self", file: str = "status") -> int:
    """One `Key:  N kB` line of /proc/PID/status (or smaps_rollup) in kB; 0 when the process has gone or there is
    no /proc. Read for another process too: a parent sampling its children's VmHWM learns their own peaks, which
    os.wait4's ru_maxrss cannot tell (it carries the parent's peak across fork and exec)."""
    try:
        with open(f"/proc/{pid}/{file}", encoding="ascii") as f:
            for line in f:
                if line.startswith(key):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


def child_pids(pid: int) -> list[int]:
    """The direct children of pid (all its threads'), from /proc; [] when it has gone."""
    out: list[int] = []
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/children", encoding="ascii") as f:
                out += [int(x) for x in f.read().split()]
    except OSError:
        pass
    return out


def peak_rss_mb() -> float:
    """This process's peak resident set size in MiB.

    On Linux VmHWM from /proc/self/status: it starts afresh at exec, whereas
    getrusage's ru_maxrss survives exec, so a benchmark worker started by a
    process that had imported torch would report its parent's peak.
    """
    kb = proc_kb("VmHWM:")
    if kb:
        return kb / 1024
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / (1024 * 1024) if sys.platform == "darwin" else r / 1024


def cpu_description() -> str:
    """CPU model and the SIMD extensions that decide INT8 speed (VNNI: int8 dot products in one instruction)."""
    try:
        with open("/proc/cpuinfo") as f:
            text = f.read()
    except OSError:
        return "unknown CPU"
    name = next((ln.split(":", 1)[1].strip() for ln in text.splitlines() if ln.startswith("model name")), "unknown")
    flags = next((ln.split(":", 1)[1].split() for ln in text.splitlines() if ln.startswith(("flags", "Features"))), [])
    isa = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8", "asimddp", "i8mm") if f in flags]
    return f"{name} [{' '.join(isa) or 'no AVX2/dot-product extensions'}]"


def file_mb(path: str | os.PathLike) -> float:
    return os.path.getsize(path) / 1e6


def table(rows: list[dict[str, Any]], columns: list[tuple[str, str, str]]) -> str:
    """Plain-text table. columns: (key, header, format spec)."""
    cells = [[h for _, h, _ in columns]]
    for r in rows:
        line = []
        for key, _, fmt in columns:
            v = r.get(key)
            line.append("-" if v is None or (isinstance(v, float) and v != v) else format(v, fmt) if fmt else str(v))
        cells.append(line)
    widths = [max(len(c[i]) for c in cells) for i in range(len(columns))]
    out = []
    for n, line in enumerate(cells):
        out.append("  ".join(c.rjust(w) if n and i else c.ljust(w) for i, (c, w) in enumerate(zip(line, widths))))
        if n == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)


def dumps(data: Any) -> str:
    return json.dumps(data, indent=2, default=float)
