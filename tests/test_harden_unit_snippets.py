"""Every systemd unit snippet in the docs is checked by systemd itself (issue 17, the administrator).

docs/install.md's "Moving the folders" drop-in once put `RequiresMountsFor=` under `[Service]`,
where systemd ignores it with only a warning: the agent would then start before the disk is
mounted. Here every fenced ``ini``/``systemd`` block in README.md and docs/*.md that looks like a
unit file or a drop-in (it has a `[Unit]`, `[Service]` or `[Install]` section) is extracted, a
drop-in is installed next to the shipped unit as `edge-agent.service.d/override.conf`, and
`systemd-analyze verify` must have nothing to say about it. A copy with a setting in the wrong
section proves that verify really reads the drop-in.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
UNIT = ROOT / "systemd" / "edge-agent.service"
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
ANALYZE = shutil.which("systemd-analyze")
needs_analyze = pytest.mark.skipif(ANALYZE is None, reason="systemd-analyze not installed (apt-get install systemd)")

_FENCE = re.compile(r"^(?P<indent>[ \t]*)```(?P<lang>[\w-]*)[ \t]*\n(?P<body>.*?)^(?P=indent)```[ \t]*$",
                    re.MULTILINE | re.DOTALL)
_SECTION = re.compile(r"^\[(Unit|Service|Install)\]$", re.MULTILINE)


def unit_snippets() -> list[tuple[str, str]]:
    """(where, text) of every fenced ini/systemd block with a unit section, indentation removed."""
    out = []
    for doc in DOCS:
        text = doc.read_text(encoding="utf-8")
        for m in _FENCE.finditer(text):
            if m.group("lang") not in ("ini", "systemd"):
                continue
            indent = len(m.group("indent"))
            body = "\n".join(line[indent:] if line[:indent].strip() == "" else line
                             for line in m.group("body").splitlines()) + "\n"
            if _SECTION.search(body):
                line = text.count("\n", 0, m.start()) + 1
                out.append((f"{doc.relative_to(ROOT)}:{line}", body))
    return out


def local_unit() -> str:
    """The shipped unit with ExecStart='s binary replaced by this interpreter (verify checks it exists)."""
    text = UNIT.read_text()
    binary = "/opt/edge-agent/venv/bin/edge-agent"
    assert f"ExecStart={binary} " in text
    return text.replace(f"ExecStart={binary} ", f"ExecStart={sys.executable} ")


def verify(snippet: str, tmp_path: Path) -> tuple[int, str]:
    """A full unit replaces the shipped one; a drop-in goes into edge-agent.service.d/ next to it."""
    d = tmp_path / "units"
    (d / "edge-agent.service.d").mkdir(parents=True)
    full = "ExecStart=" in snippet and "[Service]" in snippet
    (d / "edge-agent.service").write_text(snippet.replace("/opt/edge-agent/venv/bin/edge-agent ", sys.executable + " ")
                                          if full else local_unit())
    if not full:
        (d / "edge-agent.service.d" / "override.conf").write_text(snippet)
    r = subprocess.run([ANALYZE, "verify", "--man=no", str(d / "edge-agent.service")], capture_output=True,
                       text=True, env={**os.environ, "SYSTEMD_COLORS": "0", "SYSTEMD_LOG_COLOR": "0"})
    return r.returncode, r.stdout + r.stderr


def test_the_docs_have_unit_snippets() -> None:
    """The extraction finds the drop-ins the docs promise (moving the folders, the Jetson GPU)."""
    found = {where.split(":")[0]: body for where, body in unit_snippets()}
    bodies = "\n".join(body for _, body in unit_snippets())
    assert "docs/install.md" in found
    assert "RequiresMountsFor=" in bodies and "DeviceAllow=" in bodies, bodies


@needs_analyze
@pytest.mark.parametrize("where,snippet", unit_snippets(), ids=[w for w, _ in unit_snippets()])
def test_unit_snippet_verifies_clean(where: str, snippet: str, tmp_path: Path) -> None:
    rc, out = verify(snippet, tmp_path)
    ours = [ln for ln in out.splitlines() if "edge-agent" in ln or "override.conf" in ln]
    assert rc == 0 and not ours, f"{where}: systemd-analyze verify (rc={rc}) on\n{snippet}\n{out}"


@needs_analyze
def test_requires_mounts_for_belongs_in_unit(tmp_path: Path) -> None:
    """Guards the test above: verify reads the drop-in, and the old snippet (in [Service]) is caught."""
    rc, out = verify("[Service]\nReadWritePaths=/media/scans/inbox\nRequiresMountsFor=/media/scans\n", tmp_path)
    assert "RequiresMountsFor" in out and "override.conf" in out, out
