#!/usr/bin/env python3
"""Decode throughput: in-process decode_image (the old path) vs the memory-capped worker pool (the agent's).

    python scripts/decode_throughput.py [--count 200] [--threads 2] [--sizes 1024x768,4000x3000] \
        [--resize shorter_side_center_crop,lesion_crop,shorter_side_center_crop+lesion_crop]

Images are the example dermoscopy photos resized to each size and JPEG-encoded
(distinct content per image); `--threads` threads decode them, as the agent's
prep threads do, either directly or through a DecodePool with as many workers.
Prints images/s and CPU ms per image (this process plus the workers, from
/proc) for each path and size; the CPU figure is the one to compare on a busy
machine.
"""
from __future__ import annotations

import argparse
import sys
import threading
import time
from pathlib import Path

import cv2

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from edge_agent.decode import QualityLimits, decode_image  # noqa: E402
from edge_agent.decode_worker import DecodePool  # noqa: E402
from edge_agent.preprocess import Preprocessing  # noqa: E402


def images(size: tuple[int, int], n: int) -> list[bytes]:
    srcs = [cv2.imread(str(p)) for p in sorted((REPO / "examples" / "images").glob("*.jpg"))]
    out = []
    for i in range(n):
        img = cv2.resize(srcs[i % len(srcs)], size, interpolation=cv2.INTER_LINEAR)
        img[0, 0] = (i % 256, i // 256 % 256, 7)
        out.append(cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 92])[1].tobytes())
    return out


def cpu_seconds(pids: list[int]) -> float:
    """CPU time of this process and of the given (live) children."""
    import os
    import resource

    r = resource.getrusage(resource.RUSAGE_SELF)
    total = r.ru_utime + r.ru_stime
    tick = os.sysconf("SC_CLK_TCK")
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += (int(fields[11]) + int(fields[12])) / tick
    return total


def run(fn, datas: list[bytes], threads: int, pids: list[int]) -> tuple[float, float]:
    it = iter(range(len(datas)))
    lock = threading.Lock()

    def work() -> None:
        while True:
            with lock:
                i = next(it, None)
            if i is None:
                return
            fn(datas[i])

    ts = [threading.Thread(target=work) for _ in range(threads)]
    c0 = cpu_seconds(pids)
    t0 = time.perf_counter()
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    wall = time.perf_counter() - t0
    return len(datas) / wall, (cpu_seconds(pids) - c0) * 1000 / len(datas)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--count", type=int, default=200)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--sizes", default="1024x768,4000x3000")
    ap.add_argument("--resize", default="shorter_side_center_crop",
                    help="comma list of resize rules to compare side by side (e.g. shorter_side_center_crop,lesion_crop); "
                         "A+B: a two-view bundle's preprocessing (both squares of each image)")
    a = ap.parse_args()
    limits = QualityLimits()
    rows = []
    for rule in a.resize.split(","):
        views = tuple(rule.split("+"))
        pre = Preprocessing(input_size=192, resize=views[0], views=views if len(views) > 1 else ())
        pool = DecodePool(a.threads, pre, 64_000_000, limits, 100 << 20)
        pool.start()
        t0 = time.perf_counter()
        for _ in range(a.threads):
            pool.decode(images((64, 48), 1)[0])  # waits for the workers to be ready
        print(f"{rule}: worker start-up (first decodes through the pool): {time.perf_counter() - t0:.2f} s")
        pids = [w.proc.pid for w in pool.workers if w.proc is not None]
        for spec in a.sizes.split(","):
            w, h = (int(x) for x in spec.split("x"))
            datas = images((w, h), a.count)
            inproc, inproc_cpu = run(lambda d: decode_image(d, pre, 64_000_000, limits), datas, a.threads, [])
            pooled, pooled_cpu = run(lambda d: pool.decode(d), datas, a.threads, pids)
            rows.append(f"| {w}x{h} | {rule} | {inproc:.1f} | {inproc_cpu:.2f} | {pooled:.1f} | {pooled_cpu:.2f} "
                        f"({(pooled_cpu / inproc_cpu - 1) * 100:+.0f}%) |")
        pool.close()
    print(f"\n{a.threads} threads/workers, {a.count} JPEGs per size\n")
    print("| size | resize | in-process images/s | in-process CPU ms/img | worker pool images/s | worker pool CPU ms/img |")
    print("|---|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
