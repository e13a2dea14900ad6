"""The datasette recipe in the docs works on Raspberry Pi OS (issue 17, the administrator).

Before: README said `pip install datasette && datasette results.db`. Raspberry Pi OS bookworm
refuses a plain `pip install` (PEP 668), and the database is 0600, so datasette as anyone but the
service user says "Path '.../results.db' is not readable". Now install.md installs datasette in its
own venv and runs it as the edge-agent user, read-only, on 127.0.0.1.

Always: the recipe is checked for those properties. Where datasette is installed (on PATH, or
DATASETTE=/path/to/datasette), the documented command is run against a database written by a real
`edge-agent scan` (as the owner it answers a query; as a stranger - run as root here - it is refused).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from bundle_factory import TEST_PUBLIC_KEY
from conftest import REPO, run_agent

INSTALL = REPO / "docs" / "install.md"
README = REPO / "README.md"
DATASETTE = os.environ.get("DATASETTE") or shutil.which("datasette")


def recipe() -> str:
    text = INSTALL.read_text()
    start = text.index("### Browsing the results in a web browser (datasette)")
    section = text[start:text.index("\n### ", start + 5)]
    blocks = re.findall(r"```sh\n(.*?)```", section, re.DOTALL)
    assert blocks, "no command block in the datasette section"
    return blocks[0]


def serve_args(block: str) -> list[str]:
    """The documented `datasette serve ...` command (after `sudo -u edge-agent`), continuation lines joined."""
    line = block.replace("\\\n", " ")
    m = re.search(r"sudo -u edge-agent (\S+datasette) serve (.*)", line)
    assert m, block
    return [m.group(1), "serve", *m.group(2).split()]


def test_recipe_works_around_pep668_and_the_0600_database() -> None:
    block = recipe()
    for line in block.splitlines():
        cmd = line.split("#")[0]
        if "pip install" in cmd:  # only a venv's own pip: PEP 668 refuses the system one
            assert re.search(r"(^|\s)/opt/\S+/bin/pip install", cmd), line
    assert "python3 -m venv /opt/datasette" in block
    args = serve_args(block)
    assert args[0] == "/opt/datasette/bin/datasette" and "/var/lib/edge-agent/results.db" in args
    assert "--immutable" not in args  # a live WAL database: immutable would hide recent commits
    assert args[args.index("--host") + 1] == "127.0.0.1"  # patient data never on the network
    for doc in (README, INSTALL):
        assert "pip install datasette &&" not in doc.read_text().replace("`pip install datasette && datasette results.db`", ""), doc


@pytest.mark.skipif(DATASETTE is None, reason="datasette not installed (set DATASETTE=/path/to/datasette)")
def test_documented_command_reads_a_real_database(dirs, bundle_dir: Path, example_images) -> None:
    shutil.copy(example_images[0], dirs["inbox"] / "a.jpg")
    r = run_agent("scan", "--inbox", str(dirs["inbox"]), "--db", str(dirs["db"]), "--model", str(bundle_dir),
                  "--trusted-keys", str(TEST_PUBLIC_KEY), "--workers", "1", "--threads", "1")
    assert r.returncode == 0, r.stdout + r.stderr
    assert dirs["db"].stat().st_mode & 0o777 == 0o600
    args = serve_args(recipe())
    args = [DATASETTE, *[str(dirs["db"]) if a == "/var/lib/edge-agent/results.db" else a for a in args[1:]]]
    query = ["--get", "/results.json?sql=select+count(*)+as+n+from+results&_shape=array"]
    owner = subprocess.run(args + query, capture_output=True, text=True, timeout=120)
    assert owner.returncode == 0 and json.loads(owner.stdout) == [{"n": 1}], owner.stdout + owner.stderr
    if os.geteuid() == 0 and shutil.which("setpriv"):  # the reason for `sudo -u edge-agent`: nobody else reads it
        stranger = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", *args, *query],
                                  capture_output=True, text=True, timeout=120)
        err = stranger.stdout + stranger.stderr
        assert stranger.returncode != 0 and ("not readable" in err or "Permission denied" in err), err
