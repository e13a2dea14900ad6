"""Issue 17, clinic staff: empty inbox sub-folders are removed after their files were moved.

Before: inbox/patient-17/ stayed behind, empty, after its images moved to
processed/, and such folders piled up. Now the agent removes a sub-folder it
emptied, never the inbox itself, never a folder someone else changed within
the quiet period (a copy in progress), never one it did not empty, and never
anything reached through a symbolic link.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from faults import AgentProc, agent_env, distinct_images, outcome_count, site_args, wait_for, write_images

from edge_agent.cleanup import EmptyFolders

HOUR_AGO = time.time() - 3600


def scan(dirs: dict[str, Path], bundle: Path, *extra: str) -> subprocess.CompletedProcess:
    r = subprocess.run([sys.executable, "-m", "edge_agent", "scan", *site_args(dirs, bundle, "--log-level", "ERROR",
                                                                                   *extra)],
                       env=agent_env(), capture_output=True, text=True, timeout=180, cwd="/")
    assert r.returncode == 0, r.stderr
    return r


def age(*folders: Path) -> None:
    for f in folders:
        os.utime(f, (HOUR_AGO, HOUR_AGO))


def test_folders_emptied_by_a_scan_are_removed_but_not_the_inbox(dirs, bundle_dir) -> None:
    imgs = distinct_images(4, seed=1717)
    inbox = dirs["inbox"]
    write_images(inbox / "patient-1", imgs[:2], prefix="p1")
    write_images(inbox / "patient-2" / "visit-a", imgs[2:3], prefix="p2")
    write_images(inbox, imgs[3:], prefix="top")
    (inbox / "made-by-staff").mkdir()  # empty from the start: not the agent's to remove
    age(inbox / "patient-1", inbox / "patient-2" / "visit-a", inbox / "patient-2", inbox / "made-by-staff")
    scan(dirs, bundle_dir, "--quiet-seconds", "2")
    assert inbox.is_dir()
    assert sorted(p.name for p in inbox.iterdir()) == ["made-by-staff"]
    stored = sorted(p.relative_to(dirs["processed"]).parts[1:] for p in dirs["processed"].rglob("*.jpg"))
    assert stored == [("patient-1", "p1_0000.jpg"), ("patient-1", "p1_0001.jpg"),
                      ("patient-2", "visit-a", "p2_0000.jpg"), ("top_0000.jpg",)]


def test_a_folder_changed_within_the_quiet_period_is_kept(dirs, bundle_dir) -> None:
    inbox = dirs["inbox"]
    write_images(inbox / "copying-now", distinct_images(1, seed=1718), prefix="a")
    write_images(inbox / "old", distinct_images(2, seed=1719)[1:], prefix="b")
    age(inbox / "old")  # copying-now was changed (its file created) just now
    scan(dirs, bundle_dir, "--quiet-seconds", "600")
    assert not list((inbox / "copying-now").iterdir())  # its image was screened and moved ...
    assert (inbox / "copying-now").is_dir()  # ... but the folder is younger than the quiet period
    assert not (inbox / "old").exists()


def test_the_daemon_removes_an_emptied_folder_once_it_is_quiet(procs, dirs, bundle_dir, tmp_path) -> None:
    a = AgentProc("run", site_args(dirs, bundle_dir, "--quiet-seconds", "1", "--log-level", "INFO"),
                  tmp_path / "agent.log", registry=procs)
    wait_for(lambda: "watching" in a.log(), what="the agent watching", proc=a)
    write_images(dirs["inbox"] / "patient-9" / "today", distinct_images(2, seed=1720), prefix="c")
    wait_for(lambda: outcome_count(dirs["db"]) == 2, what="two results", proc=a)
    wait_for(lambda: not (dirs["inbox"] / "patient-9").exists(), what="the emptied folders removed", proc=a)
    assert dirs["inbox"].is_dir() and list(dirs["inbox"].iterdir()) == []
    a.term()
    assert a.wait() == 0


def test_cleanup_counts_only_foreign_changes_as_young(tmp_path) -> None:
    inbox = tmp_path / "inbox"
    (inbox / "a").mkdir(parents=True)
    f = inbox / "a" / "x.jpg"
    f.write_bytes(b"x")
    age(inbox / "a")
    folders = EmptyFolders(inbox, quiet_seconds=60)
    folders.before("a/x.jpg")
    f.unlink()  # the agent's own move makes the folder's mtime "now"
    folders.after("a/x.jpg")
    assert folders.sweep() == ["a"] and not (inbox / "a").exists()


def test_cleanup_keeps_a_folder_that_got_a_new_file_or_a_new_change(tmp_path) -> None:
    inbox = tmp_path / "inbox"
    for name in ("refilled", "touched"):
        (inbox / name).mkdir(parents=True)
        (inbox / name / "x.jpg").write_bytes(b"x")
        age(inbox / name)
    folders = EmptyFolders(inbox, quiet_seconds=60)
    for name in ("refilled", "touched"):
        folders.before(f"{name}/x.jpg")
        (inbox / name / "x.jpg").unlink()
        folders.after(f"{name}/x.jpg")
    (inbox / "refilled" / "y.jpg").write_bytes(b"y")  # the next file of a copy arrived
    (inbox / "touched" / "tmp").mkdir()  # someone else changed it just now ...
    (inbox / "touched" / "tmp").rmdir()  # ... and it is empty again, but young
    assert folders.sweep() == []
    assert (inbox / "refilled" / "y.jpg").exists() and (inbox / "touched").is_dir()
    assert folders.sweep(now_ns=time.time_ns() + 61 * 10**9) == ["touched"]  # quiet again: removed
    assert (inbox / "refilled").is_dir()


def test_cleanup_never_removes_through_a_symbolic_link(tmp_path) -> None:
    inbox, outside = tmp_path / "inbox", tmp_path / "outside"
    (inbox / "a" / "b").mkdir(parents=True)
    (outside / "b").mkdir(parents=True)
    (inbox / "a" / "b" / "x.jpg").write_bytes(b"x")
    age(inbox / "a" / "b", inbox / "a")
    folders = EmptyFolders(inbox, quiet_seconds=0)
    folders.before("a/b/x.jpg")
    (inbox / "a" / "b" / "x.jpg").unlink()
    folders.after("a/b/x.jpg")
    # a/ is swapped for a link to a folder outside the inbox that has an empty b/
    os.rename(inbox / "a", tmp_path / "a-moved")
    os.symlink(outside, inbox / "a")
    assert folders.sweep() == []
    assert (outside / "b").is_dir() and (inbox / "a").is_symlink()


def test_the_inbox_itself_is_never_a_candidate(tmp_path) -> None:
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    (inbox / "x.jpg").write_bytes(b"x")
    age(inbox)
    folders = EmptyFolders(inbox, quiet_seconds=0)
    folders.before("x.jpg")
    (inbox / "x.jpg").unlink()
    folders.after("x.jpg")
    assert folders.pending() == [] and folders.sweep() == [] and inbox.is_dir()
