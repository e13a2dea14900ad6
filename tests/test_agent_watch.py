"""Intake with a real watchdog observer: files written later, renamed in, half-written, in sub-folders.

The daemon runs in-process with quiet_seconds=60 and rescan_seconds=60, so
within these tests only real file-system events (close-write, rename) can
make a file ready: passing proves the events are used, and that nothing is
taken before it is complete. Waits are bounded only to fail instead of hang.
"""
from __future__ import annotations

import os
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from conftest import rows, settings_for, wait_for
from edge_agent.intake import Intake
from edge_agent.pipeline import Agent


@pytest.fixture
def daemon(dirs: dict[str, Path], bundle_dir: Path) -> Iterator[Callable[..., Agent]]:
    running: list[tuple[Agent, threading.Event, threading.Thread, dict]] = []

    def start(**kw) -> Agent:
        kw = {"quiet_seconds": 60.0, "rescan_seconds": 60.0, **kw}
        agent = Agent(settings_for(dirs, bundle_dir, **kw))
        stop, out = threading.Event(), {}
        t = threading.Thread(target=lambda: out.setdefault("code", agent.run(stop)), daemon=True)
        t.start()
        wait_for(lambda: agent.ready.is_set() or not t.is_alive(), what="the agent to watch the inbox")
        assert t.is_alive()
        running.append((agent, stop, t, out))
        return agent

    yield start
    for _agent, stop, t, out in running:
        stop.set()
        t.join(60)
        assert out.get("code") == 0


def outcome_names(db: Path) -> dict[str, str]:
    if not db.exists():
        return {}
    out = {}
    for table in ("results", "duplicates", "quarantine"):
        for r in rows(db, f"SELECT original_name FROM {table}"):
            out[r[0]] = table
    return out


def wait_outcome(db: Path, name: str) -> str:
    return wait_for(lambda: outcome_names(db).get(name), what=f"an outcome for {name}")


def test_file_written_after_start_is_picked_up(daemon, dirs, example_images) -> None:
    daemon()
    data = example_images[0].read_bytes()
    with open(dirs["inbox"] / "later.jpg", "wb") as f:
        f.write(data[:1000])
        f.flush()
        f.write(data[1000:])
    assert wait_outcome(dirs["db"], "later.jpg") == "results"
    assert not (dirs["inbox"] / "later.jpg").exists()


def test_atomic_rename_into_the_inbox(daemon, dirs, example_images) -> None:
    daemon()
    staging = dirs["root"] / "staging"
    staging.mkdir()
    shutil.copy(example_images[1], staging / "renamed.jpg")
    os.rename(staging / "renamed.jpg", dirs["inbox"] / "renamed.jpg")
    assert wait_outcome(dirs["db"], "renamed.jpg") == "results"


def test_part_file_is_ignored_until_renamed(daemon, dirs, example_images) -> None:
    daemon()
    part = dirs["inbox"] / "upload.jpg.part"
    shutil.copy(example_images[2], part)
    shutil.copy(example_images[3], dirs["inbox"] / "marker.jpg")  # events are handled in order
    wait_outcome(dirs["db"], "marker.jpg")
    assert part.exists() and "upload.jpg.part" not in outcome_names(dirs["db"])
    os.rename(part, dirs["inbox"] / "upload.jpg")
    assert wait_outcome(dirs["db"], "upload.jpg") == "results"


def test_half_written_file_is_not_taken(daemon, dirs, example_images) -> None:
    daemon()
    data = example_images[4].read_bytes()
    slow = open(dirs["inbox"] / "slow.jpg", "wb")
    try:
        slow.write(data[: len(data) // 2])
        slow.flush()
        shutil.copy(example_images[5], dirs["inbox"] / "marker.jpg")
        wait_outcome(dirs["db"], "marker.jpg")
        assert "slow.jpg" not in outcome_names(dirs["db"])
        slow.write(data[len(data) // 2:])
    finally:
        slow.close()
    assert wait_outcome(dirs["db"], "slow.jpg") == "results"


def test_truncated_file_closed_early_waits_for_the_rest(daemon, dirs, example_images) -> None:
    """Some copy tools close and reopen; a truncated file is deferred, not quarantined, while it may grow."""
    daemon()
    data = example_images[6].read_bytes()
    p = dirs["inbox"] / "reopened.jpg"
    p.write_bytes(data[:1500])
    shutil.copy(example_images[7], dirs["inbox"] / "marker.jpg")
    wait_outcome(dirs["db"], "marker.jpg")
    wait_for(lambda: rows(dirs["db"], "SELECT 1 FROM events WHERE kind = 'start'"), what="start event")
    assert "reopened.jpg" not in outcome_names(dirs["db"])
    with open(p, "ab") as f:
        f.write(data[1500:])
    assert wait_outcome(dirs["db"], "reopened.jpg") == "results"


def test_truncated_file_is_quarantined_after_the_partial_timeout(daemon, dirs, example_images) -> None:
    daemon(partial_timeout_seconds=0.5)
    data = example_images[8].read_bytes()
    (dirs["inbox"] / "abandoned.jpg").write_bytes(data[: len(data) // 2])
    assert wait_outcome(dirs["db"], "abandoned.jpg") == "quarantine"
    reason = rows(dirs["db"], "SELECT reason FROM quarantine")[0][0]
    assert "truncated" in reason and "unchanged for" in reason


def test_subfolders_and_folders_moved_in(daemon, dirs, example_images) -> None:
    # A file copied into a brand-new folder can land before the folder's watch exists, so its
    # close-write is never seen; the quiet period is what completes it (short here).
    daemon(quiet_seconds=0.5)
    (dirs["inbox"] / "clinic-a").mkdir()
    shutil.copy(example_images[9], dirs["inbox"] / "clinic-a" / "deep.jpg")
    assert wait_outcome(dirs["db"], "deep.jpg") == "results"
    batch = dirs["root"] / "batch"
    batch.mkdir()
    shutil.copy(example_images[10], batch / "b1.jpg")
    shutil.copy(example_images[11], batch / "b2.jpg")
    os.rename(batch, dirs["inbox"] / "batch")
    assert wait_outcome(dirs["db"], "b1.jpg") == "results" and wait_outcome(dirs["db"], "b2.jpg") == "results"
    stored = rows(dirs["db"], "SELECT stored_path FROM results WHERE original_name = 'deep.jpg'")[0][0]
    assert Path(stored).parent.name == "clinic-a"  # the inbox layout is kept under processed/


def test_duplicate_dropped_while_running(daemon, dirs, example_images) -> None:
    daemon()
    shutil.copy(example_images[0], dirs["inbox"] / "one.jpg")
    wait_outcome(dirs["db"], "one.jpg")
    shutil.copy(example_images[0], dirs["inbox"] / "two.jpg")
    assert wait_outcome(dirs["db"], "two.jpg") == "duplicates"


# --- intake rules without the observer ----------------------------------------------------

def test_intake_needs_an_event_or_a_quiet_period(tmp_path: Path, example_images: list[Path]) -> None:
    inbox = tmp_path / "in"
    inbox.mkdir()
    f = inbox / "a.jpg"
    shutil.copy(example_images[0], f)
    slow = Intake(inbox, quiet=60)
    slow.scan()  # a network share: no events, just a listing
    slow.poll()
    assert slow.take(10) == []  # not quiet for 60 s yet
    slow.observe(f, confirmed=True)  # close-write seen
    assert [c.rel for c in slow.take(10)] == ["a.jpg"]

    fast = Intake(inbox, quiet=0.05)
    fast.scan()
    time.sleep(0.2)
    fast.poll()
    assert [c.rel for c in fast.take(10)] == ["a.jpg"]


def test_intake_ignores_outputs_hidden_and_temp_names(tmp_path: Path, example_images: list[Path]) -> None:
    inbox = tmp_path / "in"
    (inbox / "processed").mkdir(parents=True)
    (inbox / ".git").mkdir()
    for rel in ("processed/x.jpg", ".git/y.jpg", ".z.jpg", "w.jpg.part", "ok.jpg"):
        shutil.copy(example_images[0], inbox / rel)
    it = Intake(inbox, exclude=[inbox / "processed"], quiet=0)
    it.scan(initial=True)
    it.poll()
    assert [c.rel for c in it.take(10)] == ["ok.jpg"]
    assert it.waiting_temp() == 1


def test_intake_holds_a_bounded_number_of_paths(tmp_path: Path) -> None:
    inbox = tmp_path / "in"
    inbox.mkdir()
    for i in range(30):
        (inbox / f"{i}.jpg").write_bytes(b"x")
    it = Intake(inbox, quiet=0, limit=10)
    it.scan(initial=True)
    assert it.backlog == 10 and it.overflowed
    it.poll()
    taken = it.take(100)
    for c in taken:
        (inbox / c.rel).unlink()
        it.done(c.rel)
    it.scan(initial=True)  # the next rescan picks up the rest
    assert it.backlog == 10


def test_low_disk_pauses_intake_and_status_says_so(daemon, dirs, example_images) -> None:
    from click.testing import CliRunner

    from edge_agent.cli import main

    agent = daemon(min_free_mb=1e12)  # more free space than any disk has
    shutil.copy(example_images[0], dirs["inbox"] / "waiting.jpg")
    wait_for(lambda: rows(dirs["db"], "SELECT 1 FROM events WHERE kind = 'paused'"), what="a paused event")
    assert agent.paused and "min_free_mb" in agent.paused
    assert (dirs["inbox"] / "waiting.jpg").exists() and "waiting.jpg" not in outcome_names(dirs["db"])
    res = CliRunner().invoke(main, ["status", "--db", str(dirs["db"])])
    assert res.exit_code == 1 and "intake paused" in res.output and "1 file(s) waiting" in res.output


def test_file_still_being_written_at_start_up_is_not_judged_early(daemon, dirs, example_images) -> None:
    """Found by the initial scan with fresh timestamps: taken provisionally, and when it fails its checks
    it is neither quarantined nor recorded until it is complete."""
    data = example_images[2].read_bytes()
    p = dirs["inbox"] / "copying.jpg"
    p.write_bytes(data[:2000])
    daemon()
    shutil.copy(example_images[3], dirs["inbox"] / "marker.jpg")
    wait_outcome(dirs["db"], "marker.jpg")
    assert "copying.jpg" not in outcome_names(dirs["db"])
    with open(p, "ab") as f:
        f.write(data[2000:])
    assert wait_outcome(dirs["db"], "copying.jpg") == "results"
