#!/usr/bin/env python3
"""Run the two files of issue 16 item 1 through `edge-agent scan` and print outcome and peak RSS.

    python scripts/decode_bombs.py [--limit-gb 1.0] [--code DIR]

--code DIR runs the edge_agent package found in DIR (e.g. an export of an older
commit: `git archive <commit> edge_agent | tar -x -C /tmp/old`) instead of this
checkout, to compare before and after. --limit-gb 0 runs without RLIMIT_AS.
Peak RSS is ru_maxrss from wait4: the agent and every process it waited for
(its decode workers).
"""
from __future__ import annotations

import argparse
import os
import resource
import sqlite3
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from test_harden_decode import png_idat_claiming_4gb, tiff_with_doubled_size_tags  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--limit-gb", type=float, default=1.0)
    ap.add_argument("--code", type=Path, default=REPO)
    a = ap.parse_args()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENCV_IO_", "ORT_", "EDGE_AGENT_"))}
    env["PYTHONPATH"] = str(a.code)
    limit = int(a.limit_gb * 2**30)
    for name, make in (("idat-4gb.png", png_idat_claiming_4gb), ("doubled-size.tif", tiff_with_doubled_size_tags)):
        with tempfile.TemporaryDirectory() as tmp:
            inbox = Path(tmp) / "inbox"
            inbox.mkdir()
            (inbox / name).write_bytes(make())
            p = subprocess.Popen([sys.executable, "-m", "edge_agent", "scan", "--inbox", str(inbox), "--db",
                                  f"{tmp}/r.db"], env=env, cwd=tmp, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                 preexec_fn=(lambda: resource.setrlimit(resource.RLIMIT_AS, (limit, limit)))
                                 if limit else None)
            _, status, usage = os.wait4(p.pid, 0)
            db = sqlite3.connect(f"{tmp}/r.db")
            q = db.execute("SELECT reason_code FROM quarantine").fetchall()
            r = db.execute("SELECT width, height FROM results").fetchall()
            print(f"{name}: exit {os.waitstatus_to_exitcode(status)}, quarantine {[x[0] for x in q]}, "
                  f"results {r}, peak RSS {usage.ru_maxrss / 1024:.0f} MB"
                  f"{f' (RLIMIT_AS {a.limit_gb} GiB)' if limit else ' (no limit)'}")


if __name__ == "__main__":
    main()
