"""Fault 2: slow and partial writes. No partial file is ever screened; an abandoned one is quarantined.

The writers are separate processes writing the way copy tools do: in small
chunks with pauses longer than a second, dying half-way, renaming into place,
overwriting a file the agent is screening. The agent runs as `edge-agent run`.
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from datetime import datetime
from pathlib import Path

import numpy as np

from faults import AgentProc, distinct_images, example_pixels, outcome_rows, sha, sha_file, site_args, wait_for

WRITER = textwrap.dedent("""
    import os, signal, sys, time
    src, dest, chunk, pause_at, pause, die_at = sys.argv[1:7]
    chunk, pause, die_at = int(chunk), float(pause), int(die_at)
    pause_at = {int(x) for x in pause_at.split(",") if x}
    data = open(src, "rb").read()
    with open(dest, "wb") as f:
        for i, off in enumerate(range(0, len(data), chunk)):
            if die_at >= 0 and off >= die_at:
                f.flush()
                os.kill(os.getpid(), signal.SIGKILL)  # the copy tool crashes: the partial file stays
            f.write(data[off:off + chunk])
            f.flush()
            if i in pause_at:
                time.sleep(pause)
""")


def writer(src: Path, dest: Path, chunk: int = 65536, pause_at: str = "", pause: float = 0.0,
           die_at: int = -1) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", WRITER, str(src), str(dest), str(chunk), pause_at, str(pause),
                             str(die_at)])


def big_jpeg(path: Path, size: tuple[int, int] = (2400, 1800), seed: int = 0) -> bytes:
    import cv2

    img = cv2.resize(example_pixels(None)[seed % 12], size, interpolation=cv2.INTER_CUBIC)
    noise = np.random.default_rng(seed).integers(-3, 4, img.shape, dtype=np.int16)
    ok, buf = cv2.imencode(".jpg", np.clip(img.astype(np.int16) + noise, 0, 255).astype(np.uint8),
                           [cv2.IMWRITE_JPEG_QUALITY, 95])
    assert ok
    path.write_bytes(buf.tobytes())
    return buf.tobytes()


def rows_for(db: Path, name: str) -> list[dict]:
    return [r for r in outcome_rows(db) if r["original_name"] == name]


def start(procs, dirs, bundle, tmp_path: Path, *extra: str, harness: list[str] | None = None) -> AgentProc:
    a = AgentProc("run", site_args(dirs, bundle, "--log-level", "INFO", *extra), tmp_path / "agent.log",
                  registry=procs, harness=harness)
    wait_for(lambda: "watching" in a.log(), what="the agent to watch the inbox", proc=a)
    return a


def stop(a: AgentProc) -> None:
    a.term()
    assert a.wait(60) == 0, a.log()[-3000:]


def test_slow_chunked_writer_is_screened_once_complete(procs, dirs, bundle_dir, tmp_path) -> None:
    """64 KiB chunks with 1.2 s pauses; the quiet period (0.5 s) is shorter than the pauses, so the agent
    does look at the half-written file during each pause - and must see that it is incomplete."""
    src = tmp_path / "big.jpg"
    data = big_jpeg(src)
    n_chunks = -(-len(data) // 65536)
    pauses = ",".join(str(n_chunks * k // 4) for k in (1, 2, 3))
    a = start(procs, dirs, bundle_dir, tmp_path, "--quiet-seconds", "0.5")
    w = writer(src, dirs["inbox"] / "slow.jpg", pause_at=pauses, pause=1.2)
    while w.poll() is None:
        assert rows_for(dirs["db"], "slow.jpg") == [], "a partial file was screened"
        time.sleep(0.05)
    assert w.returncode == 0
    got = wait_for(lambda: rows_for(dirs["db"], "slow.jpg"), what="the result for slow.jpg", proc=a)
    stop(a)
    assert len(got) == 1 and got[0]["table"] == "results" and got[0]["sha256"] == sha(data)
    assert got[0]["width"] == 2400 and sha_file(Path(got[0]["stored_path"])) == sha(data)
    assert len(rows_for(dirs["db"], "slow.jpg")) == 1
    assert "slow.jpg looks incomplete" in a.log(), "the agent never looked during a pause; the test proves nothing"


def test_writer_that_dies_halfway_leaves_a_file_that_is_quarantined_after_the_timeout(procs, dirs, bundle_dir,
                                                                                       tmp_path) -> None:
    timeout = 3.0
    src = tmp_path / "big.jpg"
    data = big_jpeg(src, (1600, 1200), seed=3)
    a = start(procs, dirs, bundle_dir, tmp_path, "--quiet-seconds", "0.5", "--partial-timeout-seconds", str(timeout))
    dead = [writer(src, dirs["inbox"] / "dead.jpg", chunk=32768, die_at=len(data) // 2),
            writer(src, dirs["inbox"] / "upload.jpg.part", chunk=32768, die_at=len(data) // 3)]
    for w in dead:
        assert w.wait(30) == -9
    died = time.time()
    names = ("dead.jpg", "upload.jpg.part")
    got = wait_for(lambda: all(rows_for(dirs["db"], n) for n in names) and outcome_rows(dirs["db"]),
                   what="both abandoned files to be quarantined", proc=a)
    stop(a)
    by = {r["original_name"]: r for r in got}
    assert {n: by[n]["table"] for n in names} == {n: "quarantine" for n in names}
    assert by["dead.jpg"]["reason_code"] == "truncated"
    assert "truncated JPEG" in by["dead.jpg"]["reason"] and f"unchanged for {timeout:.0f} s" in by["dead.jpg"]["reason"]
    assert by["upload.jpg.part"]["reason_code"] == "abandoned_partial"
    assert "temporary upload name" in by["upload.jpg.part"]["reason"]
    for n in names:  # not judged before the timeout (a lower bound; a slow machine only makes it later)
        at = datetime.fromisoformat(by[n]["quarantined_at"].replace("Z", "+00:00")).timestamp()
        assert at - died >= timeout - 1.0, f"{n} was quarantined {at - died:.1f} s after the writer died"
        assert Path(by[n]["stored_path"]).exists() and not (dirs["inbox"] / n).exists()
    assert len(outcome_rows(dirs["db"])) == 2


def test_atomic_renames_into_the_inbox(procs, dirs, bundle_dir, tmp_path) -> None:
    a = start(procs, dirs, bundle_dir, tmp_path, "--quiet-seconds", "60")  # only events can complete a file
    one, two = distinct_images(2, seed=5)
    staging = dirs["root"] / "staging"
    staging.mkdir()
    (staging / "from-outside.jpg").write_bytes(one)
    os.rename(staging / "from-outside.jpg", dirs["inbox"] / "from-outside.jpg")
    tmp = dirs["inbox"] / "inside.jpg.tmp"  # a temp name inside the inbox, renamed when complete
    with open(tmp, "wb") as f:
        f.write(two[:100])
        f.flush()
        time.sleep(0.3)
        f.write(two[100:])
    os.rename(tmp, dirs["inbox"] / "inside.jpg")
    wait_for(lambda: rows_for(dirs["db"], "from-outside.jpg") and rows_for(dirs["db"], "inside.jpg"),
             what="both renamed files", proc=a)
    stop(a)
    rows = outcome_rows(dirs["db"])
    assert sorted((r["original_name"], r["table"], r["sha256"]) for r in rows) == sorted(
        [("from-outside.jpg", "results", sha(one)), ("inside.jpg", "results", sha(two))])


def test_file_overwritten_while_it_is_screened(procs, dirs, bundle_dir, tmp_path) -> None:
    """The agent has read A; before its result is committed and the file moved, a writer replaces the file
    with B. Moving it would file B's pixels under A's result and B would never be screened."""
    first, second = distinct_images(2, seed=9)
    marker = tmp_path / "paused"
    a = start(procs, dirs, bundle_dir, tmp_path, harness=["--pause-after-read", "victim.jpg", str(marker)])
    (dirs["inbox"] / "victim.jpg").write_bytes(first)
    wait_for(marker.exists, what="the agent to read victim.jpg", proc=a)
    with open(dirs["inbox"] / "victim.jpg", "wb") as f:  # overwritten in place, as `cp` does
        f.write(second)
    marker.unlink()
    wait_for(lambda: any(r["sha256"] == sha(second) and r["file_state"] == "moved"
                         for r in rows_for(dirs["db"], "victim.jpg")), what="the new content to be screened", proc=a)
    stop(a)
    rows = {r["sha256"]: r for r in rows_for(dirs["db"], "victim.jpg")}
    assert set(rows) == {sha(first), sha(second)}, "both contents are screened, each once"
    assert rows[sha(first)]["file_state"] == "replaced"  # its result stands; its file is gone (overwritten)
    assert sha_file(Path(rows[sha(second)]["stored_path"])) == sha(second)
    assert "was replaced by another file while it was being screened" in a.log()
    assert not (dirs["inbox"] / "victim.jpg").exists()
