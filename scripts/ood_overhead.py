#!/usr/bin/env python3
"""What the OOD check costs the screening path: the agent's Engine on the shipped (format-3) bundle, batch 4,
logits only (what a format-2 bundle runs) vs logits + feature output + OOD score (what a format-3 bundle runs),
interleaved so both see the same machine state. Prints p50/p95/p99 ms per batch and images/s.

    python scripts/ood_overhead.py [--bundle edge_agent/bundle] [--iterations 500] [--threads 2]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", type=Path, default=ROOT / "edge_agent" / "bundle")
    ap.add_argument("--iterations", type=int, default=500)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    from edge_agent.bundle import load_bundle
    from edge_agent.infer import Engine

    b = load_bundle(a.bundle)
    if b.ood is None:
        print(f"{a.bundle}: {b.why_no_ood}", file=sys.stderr)
        return 2
    e = Engine(b, threads=a.threads)
    e.load()
    x = np.random.default_rng(0).standard_normal((a.batch, 3, b.input_size, b.input_size)).astype(np.float32)

    def plain() -> None:
        e.infer(x)

    def with_ood() -> None:
        _, pooled, variant = e.infer_features(x)
        b.ood.score(pooled, variant)

    runs: dict[str, list[float]] = {"logits only (format 2)": [], "logits + features + OOD score (format 3)": []}
    for _ in range(20):
        plain()
        with_ood()
    for i in range(a.iterations):
        for name, f in (list(runs.items()) if i % 2 else list(runs.items())[::-1]):
            fn = plain if name.startswith("logits only") else with_ood
            t0 = time.perf_counter()
            fn()
            f.append(time.perf_counter() - t0)
    print(f"{b.model_id} ({e.variant}), batch {a.batch}, {a.threads} threads, {a.iterations} interleaved runs each")
    print("| path | p50 ms | p95 ms | p99 ms | images/s (p50) |\n|---|---|---|---|---|")
    for name, ts in runs.items():
        p = np.percentile(np.array(ts) * 1000, [50, 95, 99])
        print(f"| {name} | {p[0]:.2f} | {p[1]:.2f} | {p[2]:.2f} | {a.batch / p[0] * 1000:.0f} |")
    from edge_agent.benchstats import peak_rss_mb

    print(f"peak RSS of this process: {peak_rss_mb():.0f} MB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
