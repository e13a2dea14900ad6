"""Fault 3: floods. 5,000 files at once, more arriving while the inbox is being scanned, nested folders
created after start: every file is screened exactly once and memory stays bounded.

The agent runs in this process (with its real watchdog observer, threads and
files) so the test can sample its queues while the flood goes through; the
files are written by a separate process, as fast as it can. The number of
paths intake may hold is lowered to 1,000 so the flood overflows it: what
does not fit is dropped and found by the next rescan (backpressure), the
same recovery as for an inotify queue overflow.
"""
from __future__ import annotations

import subprocess
import sys
import textwrap
import threading
import time

import numpy as np

from faults import assert_exactly_once, inbox_files, outcome_count, sha, wait_for

N = 5000
PRESENT, FLAT, NESTED = 2000, 2000, 1000  # in the inbox before start / dropped after / in new sub-folders
QUEUE_MAX = 16
INTAKE_LIMIT = 1000

WRITER = textwrap.dedent("""
    import os, shutil, sys
    stage, inbox = sys.argv[1], sys.argv[2]
    for name in sorted(os.listdir(stage)):
        if name.startswith("flat_"):
            shutil.copyfile(os.path.join(stage, name), os.path.join(inbox, name))
    for name in sorted(os.listdir(stage)):
        if name.startswith("nested_"):
            k = int(name.split("_")[1].split(".")[0])
            d = os.path.join(inbox, f"clinic-{k % 5}", f"day-{k % 7}", f"batch-{k % 3}")
            os.makedirs(d, exist_ok=True)
            shutil.copyfile(os.path.join(stage, name), os.path.join(d, name))
""")


def tiny_pngs(n: int, seed: int = 0) -> list[bytes]:
    import cv2

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        img = rng.integers(40, 220, (32, 32, 3), dtype=np.uint8)
        ok, buf = cv2.imencode(".png", img)
        assert ok
        out.append(buf.tobytes())
    return out


def test_flood_of_5000_files_is_screened_exactly_once_with_bounded_queues(dirs, bundle_dir, tmp_path,
                                                                          monkeypatch) -> None:
    import edge_agent.pipeline as pipeline
    from conftest import settings_for
    from edge_agent.pipeline import Agent

    monkeypatch.setattr(pipeline, "INTAKE_LIMIT", INTAKE_LIMIT)
    datas = tiny_pngs(N, seed=51)
    shas: dict[str, str] = {}
    stage = tmp_path / "stage"
    stage.mkdir()
    for i, data in enumerate(datas):
        name = f"present_{i:04d}.png" if i < PRESENT else f"flat_{i:04d}.png" if i < PRESENT + FLAT \
            else f"nested_{i:04d}.png"
        (dirs["inbox"] if i < PRESENT else stage).joinpath(name).write_bytes(data)
        shas[name] = sha(data)
    assert len(set(shas.values())) == N

    agent = Agent(settings_for(dirs, bundle_dir, queue_max=QUEUE_MAX, quiet_seconds=0.5, rescan_seconds=2.0,
                               batch_size=16, log_level="WARNING"))
    peaks = {"tracked": 0, "in_flight": 0, "prep_queue": 0, "infer_queue": 0, "commit_queue": 0}
    sampling = threading.Event()

    def sample() -> None:
        while not sampling.is_set():
            if getattr(agent, "committer", None) is not None:
                now = {"tracked": len(agent.intake._tracks), "in_flight": agent.intake.inflight,
                       "prep_queue": agent.prep_q.qsize(), "infer_queue": agent.infer_q.qsize(),
                       "commit_queue": agent.committer.queue.qsize()}
                for k, v in now.items():
                    peaks[k] = max(peaks[k], v)
            time.sleep(0.002)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    stop = threading.Event()
    out: dict = {}
    t = threading.Thread(target=lambda: out.setdefault("code", agent.run(stop)), daemon=True)
    writer = None
    try:
        t.start()
        # The writer starts while the initial scan of the first 2,000 is still going on.
        writer = subprocess.Popen([sys.executable, "-c", WRITER, str(stage), str(dirs["inbox"])])
        assert writer.wait(120) == 0
        wait_for(lambda: outcome_count(dirs["db"]) == N and not inbox_files(dirs["inbox"]), timeout=240,
                 what="all 5,000 files", interval=0.5)
    finally:
        stop.set()
        t.join(120)
        sampling.set()
        if writer is not None and writer.poll() is None:
            writer.kill()
    assert out.get("code") == 0
    print(f"peaks: {peaks}")
    assert peaks["tracked"] <= INTAKE_LIMIT, "intake held more paths than its limit"
    assert peaks["tracked"] >= INTAKE_LIMIT // 2, "the flood never filled intake; the test proves nothing"
    assert peaks["in_flight"] <= 2 * QUEUE_MAX
    for q in ("prep_queue", "infer_queue"):
        assert peaks[q] <= 2 * QUEUE_MAX, f"{q} grew to {peaks[q]}"
    assert peaks["commit_queue"] <= 2 * QUEUE_MAX + 16, f"the writer's queue grew to {peaks['commit_queue']}"
    counts = assert_exactly_once(dirs, shas)
    assert counts == {"results": N, "duplicates": 0, "quarantine": 0}
