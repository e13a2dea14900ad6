"""Logging: one line per event, journald priority prefixes under systemd, no colours off a terminal."""
from __future__ import annotations

import logging
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from edge_agent import log as logsetup


@pytest.fixture
def logfile(tmp_path: Path) -> Iterator[Path]:
    yield tmp_path / "agent.log"
    logger = logging.getLogger("edge_agent")
    for h in list(logger.handlers):
        h.close()
        logger.removeHandler(h)


def emit(path: Path, monkeypatch: pytest.MonkeyPatch, journal: bool) -> str:
    with open(path, "w") as stream:
        if journal:
            st = os.fstat(stream.fileno())
            monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino}")
        else:
            monkeypatch.delenv("JOURNAL_STREAM", raising=False)
        logsetup.setup("INFO", stream)
        lg = logging.getLogger("edge_agent.pipeline")
        lg.info("result a.jpg: nv 0.91")
        lg.warning("quarantined b.jpg:\nline two of the reason")
        lg.debug("not shown at INFO")
        try:
            raise ValueError("boom")
        except ValueError:
            lg.exception("stage failed")
    return path.read_text()


def test_plain_file_output_is_one_line_per_event_without_colour(logfile, monkeypatch) -> None:
    out = emit(logfile, monkeypatch, journal=False)
    lines = out.splitlines()
    assert len(lines) == 3 and "\x1b[" not in out
    assert "INFO pipeline: result a.jpg" in lines[0]
    assert lines[1].endswith("quarantined b.jpg: | line two of the reason")
    assert "stage failed (ValueError: boom)" in lines[2]


def test_journald_gets_priority_prefixes_and_no_timestamps(logfile, monkeypatch) -> None:
    lines = emit(logfile, monkeypatch, journal=True).splitlines()
    assert lines[0] == "<6>pipeline: result a.jpg: nv 0.91"
    assert lines[1].startswith("<4>pipeline: quarantined") and lines[2].startswith("<3>pipeline: stage failed")


def test_console_script_and_module_entry_points() -> None:
    script = Path(sys.executable).parent / "edge-agent"
    if not script.exists():
        pytest.skip("console script not installed (pip install -e . --no-deps)")
    for cmd in ([str(script), "--version"], [sys.executable, "-m", "edge_agent", "--version"]):
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
        assert r.returncode == 0 and "edge-agent" in r.stdout
