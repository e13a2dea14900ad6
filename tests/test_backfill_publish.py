"""Publishing backfill files (edge_agent/backfill/publish.py): a run's files reach `outcome=...` only while
it owns the output folder, so a SIGKILLed run's Ray workers, which finish their write task after the driver
is gone, cannot add rows behind a resume (the CI failure: 12 of 23 inputs written twice). No Ray here: the
write tasks are called directly, and the straggler holding the publish lock is a real process.
"""
from __future__ import annotations

import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

if os.environ.get("CI"):
    import pyarrow as pa
    import pyarrow.parquet as pq
else:
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")

from edge_agent.backfill.output import OutputDir  # noqa: E402
from edge_agent.backfill.publish import claim, owner, staging_dir, write_and_publish  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def _rows(keys: list[int], outcome: str = "result") -> pa.Table:
    return pa.table({"input_key": pa.array(keys, pa.int64()), "outcome": [outcome] * len(keys),
                     "original_path": [f"/archive/{k}.jpg" for k in keys]})


def _published(out: OutputDir) -> dict[str, list[int]]:
    return {Path(p).name + "@" + o: sorted(pq.read_table(p).column("input_key").to_pylist()) for o, p in out.parts()}


def test_the_owner_publishes_one_file_per_outcome_without_the_partition_column(tmp_path: Path) -> None:
    out = OutputDir(str(tmp_path / "out"))
    run = claim(out)
    assert owner(out) == run
    n = write_and_publish(out.base, run, 3, [_rows([10, 30]), _rows([20], "quarantine"), _rows([])])
    assert n == 3
    assert _published(out) == {f"part-{run}-000003.parquet@result": [10, 30],
                               f"part-{run}-000003.parquet@quarantine": [20]}
    for _, p in out.parts():
        assert "outcome" not in pq.read_schema(p).names  # hive layout: the folder name carries it
    w = out.written()
    assert w.keys.tolist() == [10, 20, 30] and (w.results, w.quarantined, w.repeated) == (2, 1, 0)
    assert not list(Path(staging_dir(out, run)).iterdir())


def test_a_retried_write_task_replaces_its_own_file_instead_of_adding_rows(tmp_path: Path) -> None:
    out = OutputDir(str(tmp_path / "out"))
    run = claim(out)
    write_and_publish(out.base, run, 0, [_rows([1, 2])])
    write_and_publish(out.base, run, 0, [_rows([1, 2])])  # Ray ran the same write task again
    write_and_publish(out.base, run, 1, [_rows([3])])
    w = out.written()
    assert w.keys.tolist() == [1, 2, 3] and w.repeated == 0 and w.results == 3


def test_a_stopped_runs_late_write_publishes_nothing_after_a_resume_claimed_the_folder(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    out = OutputDir(str(tmp_path / "out"))
    first = claim(out)
    write_and_publish(out.base, first, 0, [_rows([1])])
    second = claim(out)  # the resume, right after the first run's driver was killed
    before = out.written().keys.tolist()
    with caplog.at_level(logging.WARNING):
        n = write_and_publish(out.base, first, 1, [_rows([2, 3]), _rows([4], "quarantine")])  # its straggler
    assert n == 0 and out.written().keys.tolist() == before == [1]
    assert "no longer owns" in caplog.text and "3 row(s) not published" in caplog.text
    assert not Path(staging_dir(out, first)).exists() or not list(Path(staging_dir(out, first)).iterdir())
    assert write_and_publish(out.base, second, 0, [_rows([2, 3])]) == 2  # the resume screens them, once
    assert out.written().keys.tolist() == [1, 2, 3] and out.written().repeated == 0


def test_a_claim_waits_for_a_publish_under_way_and_clears_stopped_runs_staging(tmp_path: Path) -> None:
    """A straggler that checked the owner before the claim (it holds the shared lock) is moving its file
    when the resume starts: the claim returns only after the file is in place, so the resume counts it."""
    out = OutputDir(str(tmp_path / "out"))
    first = claim(out)
    leftover = Path(staging_dir(out, "deadbeef")) / "result-part-x.parquet"
    leftover.parent.mkdir(parents=True)
    pq.write_table(_rows([99]), leftover)  # a file a killed run staged and never published
    staged = Path(staging_dir(out, first)) / "result-part-late.parquet"
    staged.parent.mkdir(parents=True)
    pq.write_table(_rows([7]).drop_columns(["outcome"]), staged)
    final = Path(out.base) / "outcome=result" / "part-late.parquet"
    script = textwrap.dedent(f"""
        import os, sys, time
        from edge_agent.backfill.output import OutputDir
        from edge_agent.backfill.publish import publish_lock
        out = OutputDir({out.base!r})
        with publish_lock(out, exclusive=False):
            print("checked", flush=True)
            sys.stdin.readline()  # the parent has started its claim
            time.sleep(1.0)
            os.makedirs({str(final.parent)!r}, exist_ok=True)
            os.replace({str(staged)!r}, {str(final)!r})
    """)
    p = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         text=True)
    try:
        assert p.stdout is not None and p.stdin is not None
        assert p.stdout.readline().strip() == "checked"
        p.stdin.write("go\n")
        p.stdin.flush()
        second = claim(out)
        assert final.exists()  # claim() waited for the move
        assert out.written().keys.tolist() == [7]
        assert second != first and owner(out) == second
        assert not Path(staging_dir(out)).exists()  # stopped runs' unpublished files are gone
    finally:
        p.wait(timeout=30)
    assert p.returncode == 0


def test_without_a_lock_an_object_store_style_folder_is_fenced_after_the_grace(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A pyarrow filesystem that is not the local one (as an object store's): no flock; the claim waits
    PUBLISH_GRACE_S instead, and a stopped run's write after it publishes nothing."""
    import pyarrow.fs as pafs

    import edge_agent.backfill.publish as publish

    class NotLocal(OutputDir):
        def __init__(self, location: str) -> None:
            super().__init__(location)
            self.fs = pafs.SubTreeFileSystem("/", pafs.LocalFileSystem())  # same files, no local-fs type

    monkeypatch.setattr(publish, "OutputDir", NotLocal)
    slept: list[float] = []
    monkeypatch.setattr(publish.time, "sleep", slept.append)
    out = NotLocal(str(tmp_path / "out"))
    first = claim(out)
    assert write_and_publish(out.base, first, 0, [_rows([1])]) == 1
    slept.clear()
    second = claim(out)
    assert slept == [publish.PUBLISH_GRACE_S]  # no lock to wait on: the grace instead
    assert not (Path(out.meta) / "publish.lock").exists()
    assert write_and_publish(out.base, first, 1, [_rows([2])]) == 0
    assert write_and_publish(out.base, second, 0, [_rows([2])]) == 1
    assert out.written().keys.tolist() == [1, 2] and out.written().repeated == 0
