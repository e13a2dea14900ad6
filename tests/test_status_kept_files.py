"""`status` with after = keep: screened files left in the inbox on purpose are not a backlog."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from click.testing import CliRunner

from conftest import scan_now
from edge_agent.cli import main


def test_files_kept_after_screening_are_not_counted_as_waiting(dirs: dict[str, Path], bundle_dir: Path,
                                                               example_images: list[Path]) -> None:
    for p in example_images[:3]:
        shutil.copy(p, dirs["inbox"])
    assert scan_now(dirs, bundle_dir, after="keep")[0] == 0
    shutil.copy(example_images[3], dirs["inbox"] / "new.jpg")  # arrived after the scan: really waiting
    res = CliRunner().invoke(main, ["status", "--db", str(dirs["db"]), "--format", "json"])
    st = json.loads(res.output)
    assert st["backlog"] == 1 and [w["file"] for w in st["waiting"]] == ["new.jpg"]
