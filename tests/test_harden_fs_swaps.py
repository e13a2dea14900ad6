"""Issue 16 item 2: the file system changing under the agent must never make it touch a file outside the inbox.

A sub-folder of the inbox swapped for a symbolic link (to a folder outside
the inbox) between the listing and the read, or between the read and the
move; hard links to files outside the inbox; destination names that are taken
or cannot be created. The swaps are made deterministic with the pause hooks of
tests/faults.py (the agent stops right before/after reading one file until
the test has changed the tree).
"""
from __future__ import annotations

import os
from datetime import datetime, timezone
from pathlib import Path

import pytest

from faults import (AgentProc, assert_exactly_once, db_rows, distinct_images, inbox_files, outcome_rows, sha,
                    sha_file, site_args, wait_for, write_images)


def scan_paused(tmp_path: Path, dirs: dict[str, Path], bundle: Path, hook: str, name: str,
                *extra: str) -> tuple[AgentProc, Path]:
    marker = tmp_path / "paused"
    a = AgentProc("scan", site_args(dirs, bundle, "--workers", "1", "--log-level", "DEBUG", *extra),
                  tmp_path / "agent.log", harness=[hook, name, str(marker)])
    wait_for(marker.exists, what="the agent to pause at the file", proc=a)
    return a, marker


def swap_for_link(folder: Path, target: Path, away: Path) -> None:
    """The attack: the real folder leaves the inbox and a symlink to `target` takes its name."""
    os.rename(folder, away)
    os.symlink(target, folder)


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    d = tmp_path / "outside"  # a folder the agent must never read from or take files out of
    d.mkdir()
    return d


def test_folder_swapped_for_a_link_before_the_read_is_never_read(tmp_path, dirs, bundle_dir, outside) -> None:
    mine, victim = distinct_images(2, seed=161)
    (dirs["inbox"] / "sub").mkdir()
    (dirs["inbox"] / "sub" / "a.jpg").write_bytes(mine)
    (outside / "a.jpg").write_bytes(victim)
    a, marker = scan_paused(tmp_path, dirs, bundle_dir, "--pause-before-read", "a.jpg")
    swap_for_link(dirs["inbox"] / "sub", outside, tmp_path / "sub-moved-away")
    marker.unlink()
    assert a.wait(120) == 0, a.log()[-3000:]
    assert (outside / "a.jpg").read_bytes() == victim, "a file outside the inbox was moved or changed"
    rows = outcome_rows(dirs["db"])
    assert sha(victim) not in {r["sha256"] for r in rows}, "a file outside the inbox was read and recorded"
    assert rows == [], rows  # the inbox file left with its folder: it is gone, no outcome is owed
    assert not list(dirs["processed"].rglob("*.jpg")) if dirs["processed"].exists() else True
    assert "disappeared from the inbox" in a.log()


@pytest.mark.parametrize("after", ["move", "delete"])
def test_folder_swapped_for_a_link_before_the_move_moves_nothing_outside(tmp_path, dirs, bundle_dir, outside,
                                                                          after) -> None:
    """The worst case for a path-based move (or delete): the file outside has the very content that was
    screened, so neither a size/mtime check nor a hash check can tell it apart; only the folder walk and the
    inode can."""
    (mine,) = distinct_images(1, seed=162)
    (dirs["inbox"] / "sub").mkdir()
    (dirs["inbox"] / "sub" / "a.jpg").write_bytes(mine)
    (outside / "a.jpg").write_bytes(mine)
    a, marker = scan_paused(tmp_path, dirs, bundle_dir, "--pause-after-read", "a.jpg", "--after", after)
    swap_for_link(dirs["inbox"] / "sub", outside, tmp_path / "sub-moved-away")
    marker.unlink()
    assert a.wait(120) == 0, a.log()[-3000:]
    assert (outside / "a.jpg").exists() and sha_file(outside / "a.jpg") == sha(mine), \
        "the agent moved a file out of a folder outside the inbox"
    assert (tmp_path / "sub-moved-away" / "a.jpg").exists()  # the real inbox file, where the attacker put it
    rows = outcome_rows(dirs["db"])
    assert [(r["table"], r["file_state"]) for r in rows] == [("results", "missing")], rows
    stored = [p for p in dirs["processed"].rglob("*") if p.is_file()] if dirs["processed"].exists() else []
    assert stored == [], stored
    assert "replaced by a symbolic link" in a.log() and "nothing outside it is" in a.log()


def test_file_swapped_for_another_inode_with_the_same_content_is_not_moved(tmp_path, dirs, bundle_dir,
                                                                           outside) -> None:
    """Device and inode are checked between the read and the move: the same bytes in another file (a hard
    link to a file outside, renamed over the screened one) are a new file, not the one screened."""
    (mine,) = distinct_images(1, seed=163)
    (dirs["inbox"] / "a.jpg").write_bytes(mine)
    (outside / "keep.jpg").write_bytes(mine)
    a, marker = scan_paused(tmp_path, dirs, bundle_dir, "--pause-after-read", "a.jpg")
    os.link(outside / "keep.jpg", dirs["inbox"] / ".swap")
    os.rename(dirs["inbox"] / ".swap", dirs["inbox"] / "a.jpg")
    marker.unlink()
    assert a.wait(120) == 0, a.log()[-3000:]
    keep = os.stat(outside / "keep.jpg")
    assert sha_file(outside / "keep.jpg") == sha(mine)
    rows = outcome_rows(dirs["db"])
    assert [(r["table"], r["file_state"]) for r in rows] == [("results", "replaced"), ("duplicates", "moved")], rows
    # The new file (the hard link) got its own outcome; what was stored is a copy, never the shared inode.
    assert os.stat(rows[1]["stored_path"]).st_ino != keep.st_ino and inbox_files(dirs["inbox"]) == []


def test_hard_linked_file_is_screened_but_its_inode_never_leaves(dirs, bundle_dir, outside) -> None:
    from conftest import scan_now

    (mine,) = distinct_images(1, seed=164)
    (outside / "original.jpg").write_bytes(mine)
    os.link(outside / "original.jpg", dirs["inbox"] / "linked.jpg")
    code, _ = scan_now(dirs, bundle_dir)
    assert code == 0
    shas = {"linked.jpg": sha(mine)}
    assert_exactly_once(dirs, shas)
    (row,) = outcome_rows(dirs["db"])
    stored = Path(row["stored_path"])
    # The stored image is a private copy: whoever holds the other name cannot rewrite what was screened.
    assert os.stat(stored).st_ino != os.stat(outside / "original.jpg").st_ino
    assert os.stat(outside / "original.jpg").st_nlink == 1 and sha_file(outside / "original.jpg") == sha(mine)


def test_hard_linked_file_with_after_delete_removes_only_the_inbox_name(dirs, bundle_dir, outside) -> None:
    from conftest import scan_now

    (mine,) = distinct_images(1, seed=165)
    (outside / "original.jpg").write_bytes(mine)
    os.link(outside / "original.jpg", dirs["inbox"] / "linked.jpg")
    assert scan_now(dirs, bundle_dir, after="delete")[0] == 0
    assert inbox_files(dirs["inbox"]) == []
    assert sha_file(outside / "original.jpg") == sha(mine)
    assert [r["file_state"] for r in outcome_rows(dirs["db"])] == ["deleted"]


def _today() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%d")


def test_destination_that_cannot_be_created_falls_back_to_a_short_hash_name(dirs, bundle_dir) -> None:
    """A 255-byte name whose plain destination is taken (name plus tag is too long for the file system), and
    a folder whose name is held by a file in processed/: both end moved under a short hash-based name, not
    left in the inbox with a message about permissions."""
    from conftest import scan_now

    long_name = "L" * 251 + ".jpg"
    imgs = distinct_images(3, seed=166)
    shas = write_images(dirs["inbox"], imgs[:1], prefix="plain")
    (dirs["inbox"] / long_name).write_bytes(imgs[1])
    (dirs["inbox"] / "d").mkdir()
    (dirs["inbox"] / "d" / "x.jpg").write_bytes(imgs[2])
    day = dirs["processed"] / _today()
    day.mkdir(parents=True)
    (day / long_name).write_bytes(b"someone else's file")
    (day / "d").write_bytes(b"a file where the agent needs a folder")
    code, agent = scan_now(dirs, bundle_dir)
    assert code == 0
    shas |= {long_name: sha(imgs[1]), "x.jpg": sha(imgs[2])}
    assert_exactly_once(dirs, shas)
    assert (day / long_name).read_bytes() == b"someone else's file"
    assert (day / "d").read_bytes() == b"a file where the agent needs a folder"
    for r in outcome_rows(dirs["db"]):
        if r["original_name"] in (long_name, "x.jpg"):
            assert Path(r["stored_path"]).parent == day and Path(r["stored_path"]).name.startswith(r["sha256"][:16])


def test_a_move_never_replaces_a_file_that_took_the_name_meanwhile(tmp_path) -> None:
    """The recorded destination was free when the row was written and taken before the move (another agent
    sharing processed/, a person): the file that is there stays, the image gets the next free name."""
    from edge_agent.fsafe import Dest, Source, move_file

    inbox, base = tmp_path / "in", tmp_path / "out"
    inbox.mkdir()
    (inbox / "a.jpg").write_bytes(b"screened")
    (base / "2026-01-01").mkdir(parents=True)
    (base / "2026-01-01" / "a.jpg").write_bytes(b"already there")
    s = os.lstat(inbox / "a.jpg")
    went = move_file(Source(inbox, "a.jpg", (s.st_dev, s.st_ino), None),
                     Dest(base, "2026-01-01", "a.jpg", "0123456789abcdef" * 4, prefer="2026-01-01/a.jpg"))
    assert (base / "2026-01-01" / "a.jpg").read_bytes() == b"already there"
    assert went == base / "2026-01-01" / "a-01234567.jpg" and went.read_bytes() == b"screened"
    assert not (inbox / "a.jpg").exists()


def test_quarantined_symlink_is_moved_as_a_link_and_its_target_untouched(dirs, bundle_dir, outside) -> None:
    from conftest import scan_now

    (victim,) = distinct_images(1, seed=167)
    (outside / "secret.jpg").write_bytes(victim)
    os.symlink(outside / "secret.jpg", dirs["inbox"] / "link.jpg")
    assert scan_now(dirs, bundle_dir)[0] == 0
    (row,) = outcome_rows(dirs["db"])
    assert row["table"] == "quarantine" and row["reason_code"] == "symlink" and row["sha256"] is None
    assert os.path.islink(row["stored_path"]) and (outside / "secret.jpg").read_bytes() == victim
    assert db_rows(dirs["db"], "SELECT count(*) FROM results")[0][0] == 0


def test_move_finished_after_a_crash_between_copy_and_unlink_leaves_one_copy(tmp_path) -> None:
    """Crash after the copy (or the link) reached its recorded place but before the inbox name was removed:
    the restart finds both; the move completes onto the recorded place instead of storing a second copy."""
    import hashlib

    from edge_agent.fsafe import Dest, Source, move_file

    inbox, base = tmp_path / "in", tmp_path / "out"
    (base / "2026-01-01").mkdir(parents=True)
    inbox.mkdir()
    data = b"screened image bytes"
    digest = hashlib.sha256(data).hexdigest()
    for how in ("copy", "link"):
        (inbox / "a.jpg").write_bytes(data)
        recorded = base / "2026-01-01" / f"a-{how}.jpg"
        if how == "copy":
            recorded.write_bytes(data)
        else:
            os.link(inbox / "a.jpg", recorded)
        s = os.lstat(inbox / "a.jpg")
        went = move_file(Source(inbox, "a.jpg", (s.st_dev, s.st_ino), digest),
                         Dest(base, "2026-01-01", "a.jpg", digest, prefer=f"2026-01-01/a-{how}.jpg"))
        assert went == recorded and recorded.read_bytes() == data and not (inbox / "a.jpg").exists()
    assert sorted(p.name for p in (base / "2026-01-01").iterdir()) == ["a-copy.jpg", "a-link.jpg"]
    # a different file at the recorded place is never taken for it
    (inbox / "b.jpg").write_bytes(data)
    (base / "2026-01-01" / "b.jpg").write_bytes(b"other content")
    s = os.lstat(inbox / "b.jpg")
    went = move_file(Source(inbox, "b.jpg", (s.st_dev, s.st_ino), digest),
                     Dest(base, "2026-01-01", "b.jpg", digest, prefer="2026-01-01/b.jpg"))
    assert went != base / "2026-01-01" / "b.jpg" and went.read_bytes() == data
    assert (base / "2026-01-01" / "b.jpg").read_bytes() == b"other content"
