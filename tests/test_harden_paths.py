"""Issue 16 items 5 and 7: paths that loop, and one-shot commands that must fail fast with the cause.

Every configured path is resolved to its real path at start; the database,
the bundle and the output folders may not be inside the inbox, however they
are spelled (directly, or through a symlinked inbox whose real path holds
them). A missing --inbox or a --db that is a folder ends in exit 2 and a
message, never a traceback.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from faults import agent_env, assert_exactly_once, distinct_images, outcome_rows, site_args, write_images


def scan(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edge_agent", "scan", *args], env=agent_env(), capture_output=True,
                          text=True, timeout=120)


def refused(r: subprocess.CompletedProcess, *words: str) -> None:
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    assert "Traceback" not in r.stderr + r.stdout, r.stderr
    for w in words:
        assert w in r.stderr, (w, r.stderr)


def test_database_inside_the_inbox_is_refused(dirs, bundle_dir) -> None:
    shas = write_images(dirs["inbox"], distinct_images(2, seed=181))
    db = dirs["inbox"] / "results.db"
    r = scan(*site_args({**dirs, "db": db}, bundle_dir))
    refused(r, "inside the inbox", "database")
    assert not db.exists() and sorted(p.name for p in dirs["inbox"].iterdir()) == sorted(shas)
    # the same through a symlink outside the inbox that points into it
    link = dirs["root"] / "db-link"
    os.symlink(dirs["inbox"], link)
    refused(scan(*site_args({**dirs, "db": link / "results.db"}, bundle_dir)), "inside the inbox")
    assert sorted(p.name for p in dirs["inbox"].iterdir()) == sorted(shas)


def test_outputs_and_bundle_inside_the_real_inbox_are_refused(dirs, bundle_dir, tmp_path) -> None:
    """The inbox given through a symlink: processed_dir inside its real path used to be screened again at
    every rescan (excluded by the link's spelling only)."""
    real_inbox = dirs["inbox"]
    link = tmp_path / "inbox-link"
    os.symlink(real_inbox, link)
    base = {**dirs, "inbox": link}
    for flag, value in (("--processed-dir", real_inbox / "processed"), ("--quarantine-dir", real_inbox / "q")):
        refused(scan(*site_args(base, bundle_dir, flag, str(value))), "inside the inbox")
    inside_bundle = real_inbox / "bundle"
    shutil.copytree(bundle_dir, inside_bundle)
    refused(scan(*site_args({**base, "db": dirs["db"]}, inside_bundle)), "inside the inbox", "model")
    assert not dirs["db"].exists()


def test_symlinked_inbox_works_and_records_real_paths(dirs, bundle_dir, tmp_path) -> None:
    shas = write_images(dirs["inbox"], distinct_images(3, seed=182))
    link = tmp_path / "inbox-link"
    os.symlink(dirs["inbox"], link)
    r = scan(*site_args({**dirs, "inbox": link}, bundle_dir))
    assert r.returncode == 0, r.stderr
    assert_exactly_once(dirs, shas)
    real = os.path.realpath(dirs["inbox"])
    assert all(Path(row["original_path"]).parent == Path(real) for row in outcome_rows(dirs["db"]))


def test_scan_without_inbox_or_with_a_folder_as_database_fails_fast(dirs, bundle_dir, tmp_path) -> None:
    refused(scan("--db", str(dirs["db"]), "--model", str(bundle_dir)), "no inbox set")
    folder = tmp_path / "a-folder"
    folder.mkdir()
    refused(scan("--inbox", str(dirs["inbox"]), "--db", str(folder), "--model", str(bundle_dir)), "is a folder")
    refused(scan("--inbox", str(dirs["inbox"]), "--model", str(bundle_dir)), "no database set")
    refused(scan("--inbox", str(tmp_path / "missing"), "--db", str(dirs["db"])), "does not exist")
    for cmd in ("status", "results"):
        r = subprocess.run([sys.executable, "-m", "edge_agent", cmd, "--db", str(folder)], env=agent_env(),
                           capture_output=True, text=True, timeout=60)
        refused(r, "is a folder")


def test_settings_refuse_every_output_inside_the_inbox(tmp_path) -> None:
    from edge_agent.config import ConfigError, load_settings

    inbox = tmp_path / "in"
    inbox.mkdir()
    for key, value in (("db", inbox / "x.db"), ("model", inbox / "b"), ("processed_dir", inbox / "p"),
                       ("quarantine_dir", inbox / "sub" / "q")):
        with pytest.raises(ConfigError, match="inside the inbox"):
            load_settings({"inbox": inbox, "db": tmp_path / "r.db", key: value}, environ={})
