"""Shared fixtures for the edge_agent tests: a real bundle, real images, real folders and databases."""
from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from bundle_factory import TEST_PUBLIC_KEY, make_bundle  # noqa: E402
from faults import agent_env  # noqa: E402,F401  (one definition, shared with the fault suite)

# Test bundles are signed with the tests' key (bundle_factory): trust it wherever the environment is read
# (in-process CLI runs, verify_bundle(path) without explicit trust). agent_env() and settings_for() pass it on.
os.environ["EDGE_AGENT_TRUSTED_KEYS"] = str(TEST_PUBLIC_KEY)

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples" / "images"


@pytest.fixture(scope="session")
def bundle_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A valid bundle shared by the session; copy it (fresh_bundle) before modifying."""
    return make_bundle(tmp_path_factory.mktemp("bundles") / "bundle")


@pytest.fixture
def fresh_bundle(bundle_dir: Path, tmp_path: Path) -> Path:
    dest = tmp_path / "bundle"
    shutil.copytree(bundle_dir, dest)
    return dest


@pytest.fixture(scope="session")
def example_images() -> list[Path]:
    paths = sorted(EXAMPLES.glob("*.jpg"))
    assert len(paths) == 12, f"expected the 12 example images in {EXAMPLES}"
    return paths


@pytest.fixture
def dirs(tmp_path: Path) -> dict[str, Path]:
    """inbox, db, processed, quarantine paths for one agent; only the inbox exists."""
    root = tmp_path / "site"
    inbox = root / "inbox"
    inbox.mkdir(parents=True)
    return {"root": root, "inbox": inbox, "db": root / "db" / "results.db", "processed": root / "processed",
            "quarantine": root / "quarantine"}


def variant_jpegs(sources: list[Path], dest: Path, n: int, prefix: str = "img") -> list[Path]:
    """n distinct JPEGs derived from real dermoscopy images (shifted brightness), named prefix_i.jpg."""
    dest.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(n):
        img = cv2.imread(str(sources[i % len(sources)]))
        img = cv2.add(img, np.full_like(img, i // len(sources) + 1)) if i >= len(sources) else img
        p = dest / f"{prefix}_{i:03d}.jpg"
        cv2.imwrite(str(p), img)
        out.append(p)
    return out


def settings_for(dirs: dict[str, Path], bundle: Path, **kw: Any):
    from edge_agent.config import load_settings

    flags = {"inbox": dirs["inbox"], "db": dirs["db"], "model": bundle, "workers": 2, "threads": 1,
             "quiet_seconds": 0.0, "log_level": "WARNING", "trusted_keys": (TEST_PUBLIC_KEY,), **kw}
    return load_settings(flags, environ={})


def scan_now(dirs: dict[str, Path], bundle: Path, **kw: Any):
    """Run a real one-shot scan in-process; returns (exit code, agent)."""
    from edge_agent.pipeline import Agent

    agent = Agent(settings_for(dirs, bundle, **kw), one_shot=True)
    return agent.scan(), agent


def rows(db: Path, sql: str, params: tuple = ()) -> list[sqlite3.Row]:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    conn.row_factory = sqlite3.Row
    try:
        return conn.execute(sql, params).fetchall()
    finally:
        conn.close()


def wait_for(cond: Callable[[], Any], timeout: float = 30.0, what: str = "condition") -> Any:
    """Poll until cond() is truthy. The timeout only bounds a hang; no test asserts on durations."""
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)




def agent_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "edge_agent", *args]


def run_agent(*args: str, env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(agent_cmd(*args), env=env or agent_env(), capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def db_rows() -> Callable[..., list[sqlite3.Row]]:
    return rows


@pytest.fixture
def procs() -> Iterator[list[subprocess.Popen]]:
    """Subprocesses started by a test; any still running at the end are SIGKILLed (by pid)."""
    started: list[subprocess.Popen] = []
    yield started
    for p in started:
        if p.poll() is None:
            p.kill()
            p.wait(timeout=10)


@pytest.fixture(autouse=True)
def _detach_cli_log_handlers() -> Iterator[None]:
    """CliRunner replaces stderr; drop handlers the CLI attached to it once the test is over."""
    import logging

    yield
    logger = logging.getLogger("edge_agent")
    for h in list(logger.handlers):
        logger.removeHandler(h)
    logger.propagate = True
    logger.setLevel(logging.NOTSET)
