"""`edge-agent review` as a real server process for the browser and CLI tests."""
from __future__ import annotations

import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

from conftest import agent_cmd
from faults import agent_env


def free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def start_review(dirs: dict[str, Path], bundle: Path, log: Path, *extra: str) -> tuple[subprocess.Popen, str]:
    """Start the app on a free port; returns (process, base URL) once it answers."""
    port = free_port()
    fh = open(log, "wb")
    proc = subprocess.Popen(agent_cmd("review", "--db", str(dirs["db"]), "--inbox", str(dirs["inbox"]),
                                      "--model", str(bundle), "--port", str(port), *extra),
                            env=agent_env(), stdout=fh, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + 60
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                if r.status == 200:
                    return proc, url
        except (urllib.error.URLError, ConnectionError, OSError):
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"the review app did not start: {log.read_text(errors='replace')[-2000:]}")
        time.sleep(0.1)
