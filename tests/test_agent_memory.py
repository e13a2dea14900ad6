"""The agent's main process stays free of OpenCV: its decode workers touch the pixels, and importing
OpenCV in the process that holds the model sessions cost 17 MB of resident memory for nothing (the issue's
bar: peak RSS < 200 MB during a 1,000-image scan; docs/benchmarks.md has the before/after). A real scan of
the example images with the shipped bundle, in a subprocess whose modules are listed at the end.
"""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from conftest import EXAMPLES, REPO, rows
from faults import agent_env

SCAN_AND_LIST_MODULES = """
import sys
from edge_agent.cli import main
try:
    main(sys.argv[1:], standalone_mode=False)
finally:
    print("MODULES", " ".join(sorted(m for m in sys.modules if "." not in m)))
"""


def test_a_scan_screens_every_image_without_opencv_in_the_main_process(tmp_path: Path) -> None:
    inbox = tmp_path / "inbox"
    shutil.copytree(EXAMPLES, inbox)
    images = sorted(p.name for p in inbox.iterdir() if p.is_file())
    db = tmp_path / "db" / "results.db"
    r = subprocess.run([sys.executable, "-c", SCAN_AND_LIST_MODULES, "scan", "--inbox", str(inbox), "--db", str(db),
                        "--after", "keep", "--workers", "2", "--threads", "1"],
                       env=agent_env(), cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    screened = sorted(Path(x["original_path"]).name for x in rows(db, "SELECT original_path FROM results"))
    assert screened == images  # the decode workers decoded every image: OpenCV ran, in them
    modules = next(ln for ln in r.stdout.splitlines() if ln.startswith("MODULES ")).split()[1:]
    assert "onnxruntime" in modules and "edge_agent" in modules  # the list is the screening process's
    assert "cv2" not in modules, "the agent's main process imported OpenCV during a scan"
