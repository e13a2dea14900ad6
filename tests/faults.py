"""Helpers for the fault-injection (test_fault_*.py) and hostile-input (test_hostile_*.py) suites.

Everything here drives the real agent: `edge-agent run`/`scan` as a
subprocess on real folders, with real files written the way clinics write
them. The accounting helpers state the invariant the suites prove: every
file that entered the inbox has exactly one outcome row (result, duplicate
or quarantine), no content is recorded twice, every recorded file lies where
its row says with the content its row says, and the database is intact.

Run as a script it is also a harness around the real CLI
(`python tests/faults.py harness [--audit LOG] [--pause-after-read NAME MARKER]
[--pause-before-read NAME MARKER] -- ARGS...` runs `edge-agent ARGS` with a
Python audit hook that logs file, socket and process events as JSON lines,
and/or a pause right before or after one file is read), and it prints the hostile-input table
(`python tests/faults.py hostile-table`).
"""
from __future__ import annotations

import hashlib
import json
import functools
import os
import shutil
import signal
import sqlite3
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
EXAMPLES = REPO / "examples" / "images"
UNIT = REPO / "systemd" / "edge-agent.service"
TABLES = ("results", "duplicates", "quarantine")


# --- images -------------------------------------------------------------------------------

def _cv2() -> Any:
    import cv2  # imported lazily: the audit wrapper must not pull it in before the hook is installed

    return cv2


def example_pixels(size: tuple[int, int] | None = (64, 48)) -> list[Any]:
    """The 12 example dermoscopy images as BGR arrays, optionally resized (w, h)."""
    cv2 = _cv2()
    out = []
    for p in sorted(EXAMPLES.glob("*.jpg")):
        img = cv2.imread(str(p))
        out.append(img if size is None else cv2.resize(img, size, interpolation=cv2.INTER_AREA))
    assert len(out) == 12, f"expected the 12 example images in {EXAMPLES}"
    return out


def distinct_images(n: int, ext: str = ".jpg", size: tuple[int, int] = (64, 48), seed: int = 0) -> list[bytes]:
    """n encoded images with distinct content: the examples, resized, with a little seeded noise each."""
    import numpy as np

    cv2 = _cv2()
    base = example_pixels(size)
    rng = np.random.default_rng(seed)
    out: list[bytes] = []
    seen: set[str] = set()
    for i in range(n):
        img = base[i % len(base)].astype(np.int16) + rng.integers(-6, 7, base[0].shape, dtype=np.int16)
        ok, buf = cv2.imencode(ext, np.clip(img, 0, 255).astype(np.uint8))
        assert ok
        data = buf.tobytes()
        h = sha(data)
        assert h not in seen
        seen.add(h)
        out.append(data)
    return out


def write_images(dest: Path, datas: Iterable[bytes], prefix: str = "img", ext: str = ".jpg") -> dict[str, str]:
    """Write the images as dest/prefix_NNNN.ext; returns name -> sha256."""
    dest.mkdir(parents=True, exist_ok=True)
    out = {}
    for i, data in enumerate(datas):
        name = f"{prefix}_{i:04d}{ext}"
        (dest / name).write_bytes(data)
        out[name] = sha(data)
    return out


def with_exif_orientation(jpeg: bytes, orientation: int) -> bytes:
    """The same JPEG with an APP1 EXIF segment carrying only the Orientation tag."""
    tiff = b"II*\x00" + struct.pack("<I", 8) + struct.pack("<H", 1) + struct.pack("<HHII", 0x0112, 3, 1, orientation) \
        + struct.pack("<I", 0)
    app1 = b"Exif\x00\x00" + tiff
    return jpeg[:2] + b"\xff\xe1" + struct.pack(">H", len(app1) + 2) + app1 + jpeg[2:]


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha_file(path: Path) -> str:
    return sha(Path(path).read_bytes())


# --- the agent as a subprocess ------------------------------------------------------------

def agent_env(**extra: str) -> dict[str, str]:
    """Environment for agent subprocesses: no inherited EDGE_AGENT_* or systemd variables, except that the
    tests' bundle-signing key is trusted (EDGE_AGENT_TRUSTED_KEYS; pass it as '' to trust only the project's)."""
    from bundle_factory import TEST_PUBLIC_KEY

    env = {k: v for k, v in os.environ.items()
           if not k.startswith("EDGE_AGENT_") and k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID",
                                                             "JOURNAL_STREAM")}
    env["EDGE_AGENT_TRUSTED_KEYS"] = str(TEST_PUBLIC_KEY)
    env.update(extra)
    return env


def site_args(dirs: dict[str, Path], bundle: Path, *extra: str) -> list[str]:
    return ["--inbox", str(dirs["inbox"]), "--db", str(dirs["db"]), "--model", str(bundle), "--workers", "2",
            "--threads", "1", *extra]


class AgentProc:
    """`edge-agent CMD ...` in the background; its log goes to a file (a pipe nobody reads would fill up
    and block the agent's logging)."""

    def __init__(self, cmd: str, args: list[str], log: Path, env: dict[str, str] | None = None,
                 prefix: list[str] | tuple[str, ...] = (), registry: list | None = None,
                 harness: list[str] | None = None) -> None:
        self.log_path = log
        log.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(log, "ab")
        self.started = time.monotonic()
        # harness: options for `faults.py harness` (audit hook, pauses), which then runs the real CLI
        entry = [str(HERE / "faults.py"), "harness", *harness, "--"] if harness is not None else ["-m", "edge_agent"]
        self.argv = [*prefix, sys.executable, *entry, cmd, *args]
        self.p = subprocess.Popen(self.argv, stdout=self._log, stderr=subprocess.STDOUT, env=env or agent_env(),
                                  cwd=str(log.parent))
        if registry is not None:
            registry.append(self.p)

    @property
    def pid(self) -> int:
        """The agent's pid: under a tracer (strace) it is the tracer's child, which signals must reach."""
        if self.argv and os.path.basename(self.argv[0]) == "strace":
            try:
                children = Path(f"/proc/{self.p.pid}/task/{self.p.pid}/children").read_text().split()
                if children:
                    return int(children[0])
            except OSError:
                pass
        return self.p.pid

    def alive(self) -> bool:
        return self.p.poll() is None

    def log(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_bytes().decode("utf-8", "replace")

    def kill(self) -> int:
        self._signal(signal.SIGKILL)
        return self.wait(30)

    def term(self) -> None:
        self._signal(signal.SIGTERM)

    def _signal(self, sig: int) -> None:
        pid = self.pid
        if pid == self.p.pid:
            self.p.send_signal(sig)
        else:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass

    def wait(self, timeout: float = 60) -> int:
        try:
            return self.p.wait(timeout)
        finally:
            if self.p.poll() is not None:
                self._log.close()


def wait_for(cond: Callable[[], Any], timeout: float = 60.0, what: str = "condition",
             proc: AgentProc | None = None, interval: float = 0.05) -> Any:
    """Poll until cond() is truthy; fails (with the agent's log tail) on timeout or when `proc` died."""
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if proc is not None and not proc.alive():
            value = cond()
            if value:
                return value
            raise AssertionError(f"the agent exited ({proc.p.returncode}) while waiting for {what}:\n"
                                 + proc.log()[-4000:])
        if time.monotonic() > deadline:
            tail = ("\n" + proc.log()[-4000:]) if proc is not None else ""
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}{tail}")
        time.sleep(interval)


# --- reading the outcome --------------------------------------------------------------------

def db_rows(db: Path, sql: str, params: tuple = ()) -> list[sqlite3.Row]:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)
    conn.row_factory = sqlite3.Row
    try:
        return conn.execute(sql, params).fetchall()
    finally:
        conn.close()


def outcome_rows(db: Path) -> list[dict[str, Any]]:
    """Every outcome row of every table, as dicts with a 'table' key ([] before the schema exists)."""
    if not Path(db).exists():
        return []
    out = []
    try:
        for t in TABLES:
            for r in db_rows(db, f"SELECT * FROM {t} ORDER BY id"):
                out.append({"table": t, **dict(r)})
    except sqlite3.OperationalError:  # not created yet
        return []
    return out


def outcome_count(db: Path) -> int:
    """Rows in the three outcome tables (0 before the schema exists); cheap enough to poll."""
    if not Path(db).exists():
        return 0
    try:
        return sum(db_rows(db, f"SELECT count(*) FROM {t}")[0][0] for t in TABLES)
    except sqlite3.OperationalError:
        return 0


def integrity(db: Path) -> str:
    conn = sqlite3.connect(str(db), timeout=30)
    try:
        return ";".join(r[0] for r in conn.execute("PRAGMA integrity_check"))
    finally:
        conn.close()


def inbox_files(inbox: Path) -> list[Path]:
    """Everything in the inbox that is not a folder (files, links, pipes), hidden ones included."""
    out = []
    for dirpath, dirnames, filenames in os.walk(inbox):
        for d in dirnames:
            if os.path.islink(os.path.join(dirpath, d)):
                out.append(Path(dirpath) / d)
        out += [Path(dirpath) / f for f in filenames]
    return out


def assert_exactly_once(dirs: dict[str, Path], shas: dict[str, str], bad: Iterable[str] = (),
                        inbox_empty: bool = True) -> dict[str, int]:
    """The invariant: shas (original name -> sha256 of every file that entered the inbox) each have exactly
    one outcome row; `bad` are the names that had to be quarantined; each content is screened once; every
    recorded file lies at its stored_path with the recorded content; nothing is left in the inbox."""
    rows = outcome_rows(dirs["db"])
    by_name: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        by_name.setdefault(r["original_name"], []).append(r)
    twice = {n: [(r["table"], r["id"], r["file_state"]) for r in rs] for n, rs in by_name.items() if len(rs) > 1}
    assert not twice, f"files with more than one outcome: {twice}"
    missing = sorted(set(shas) - set(by_name))
    assert not missing, f"{len(missing)} files have no outcome: {missing[:10]}"
    unknown = sorted(set(by_name) - set(shas))
    assert not unknown, f"outcome rows for files that never entered the inbox: {unknown[:10]}"
    quarantined = {n for n, rs in by_name.items() if rs[0]["table"] == "quarantine"}
    assert quarantined == set(bad), f"quarantined {sorted(quarantined)}, expected {sorted(bad)}"
    results = [r for r in rows if r["table"] == "results"]
    assert len({r["sha256"] for r in results}) == len(results), "a content was screened twice"
    good = {shas[n] for n in shas if n not in set(bad)}
    assert {r["sha256"] for r in results} == good, "every distinct good content has exactly one result"
    for r in rows:
        if r["table"] == "quarantine":
            assert r["reason"] and r["reason_code"]
        else:
            assert r["sha256"] == shas[r["original_name"]]
        assert r["file_state"] == "moved", (r["original_name"], r["table"], r["file_state"])
        stored = Path(r["stored_path"])
        assert stored.exists(), f"{r['original_name']}: recorded at {stored}, which does not exist"
        if r["sha256"]:
            assert sha_file(stored) == r["sha256"], f"{stored} does not hold the content its row records"
    if inbox_empty:
        left = inbox_files(dirs["inbox"])
        assert left == [], f"{len(left)} files left in the inbox: {left[:10]}"
    assert integrity(dirs["db"]) == "ok"
    return {t: sum(1 for r in rows if r["table"] == t) for t in TABLES}


def unit_timeout_stop(default: float = 90.0) -> float:
    """TimeoutStopSec= of the shipped systemd unit, in seconds."""
    for line in UNIT.read_text().splitlines():
        if line.strip().startswith("TimeoutStopSec="):
            value = line.split("=", 1)[1].strip()
            return float(value.rstrip("s"))
    return default


# --- privilege helpers ------------------------------------------------------------------------

NOBODY = 65534


def unprivileged_prefix() -> list[str] | None:
    """Command prefix that runs a process without root's power over permission bits: [] when we are not
    root, setpriv to uid/gid 65534 when we are and it exists, None when that cannot be done."""
    if os.geteuid() != 0:
        return []
    exe = shutil.which("setpriv")
    if exe is None:
        return None
    prefix = [exe, f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]
    return prefix if _nobody_can_run_agent(tuple(prefix)) else None


@functools.lru_cache(maxsize=None)
def _nobody_can_run_agent(prefix: tuple[str, ...]) -> bool:
    """The unprivileged user must be able to import the agent's dependencies from this interpreter and
    read this checkout (a virtualenv or a clone inside a 0700 folder, such as one under `mktemp -d`, is
    invisible to it)."""
    code = f"import click, onnxruntime, cv2, watchdog, sqlite_utils; open({str(Path(__file__).resolve())!r}).close()"
    probe = subprocess.run([*prefix, sys.executable, "-c", code], capture_output=True, timeout=60, cwd="/")
    return probe.returncode == 0


def give_to_nobody(*paths: Path) -> None:
    """chown paths (recursively, links themselves) to the unprivileged user when we are root."""
    if os.geteuid() != 0:
        return
    for top in paths:
        os.lchown(top, NOBODY, NOBODY)
        for dirpath, dirnames, filenames in os.walk(top):
            for n in dirnames + filenames:
                os.lchown(os.path.join(dirpath, n), NOBODY, NOBODY)


# --- the audit wrapper ------------------------------------------------------------------------

AUDITED = {"open", "os.listdir", "os.scandir", "os.rename", "os.remove", "os.rmdir", "os.mkdir", "os.chmod",
           "os.chown", "os.link", "os.symlink", "os.truncate", "os.utime", "shutil.copyfile", "shutil.rmtree",
           "shutil.move", "socket.__new__", "socket.connect", "socket.bind", "socket.sendto", "socket.sendmsg",
           "socket.getaddrinfo", "socket.gethostbyname", "socket.gethostbyaddr", "subprocess.Popen",
           "os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork", "os.forkpty", "pty.spawn"}


def _install_pause_after_read(name: str, marker: Path, before: bool = False) -> None:
    """Make the agent stop right after (before: right before) it reads the inbox file called `name` (the
    first time only): it writes `marker` and waits (30 s at most) until the test deletes it, so a test can
    change the file (or the folders above it) between the listing, the read and the commit/move
    deterministically."""
    import edge_agent.pipeline as pl

    real = pl.read_file
    done: list[bool] = []

    def pause(path: Path) -> None:
        if Path(path).name == name and not done:
            done.append(True)
            marker.write_text(str(path))
            deadline = time.monotonic() + 30
            while marker.exists() and time.monotonic() < deadline:
                time.sleep(0.01)

    def read_then_pause(path: Path, *a: Any, **kw: Any) -> Any:
        if before:
            pause(path)
        got = real(path, *a, **kw)
        if not before:
            pause(path)
        return got

    pl.read_file = read_then_pause


def _harness_main(argv: list[str]) -> None:
    """faults.py harness [--audit LOG] [--pause-after-read NAME MARKER] -- EDGE-AGENT ARGS"""
    sep = argv.index("--")
    opts, args = argv[:sep], argv[sep + 1:]
    sys.path.insert(0, str(REPO))
    while opts:
        opt = opts.pop(0)
        if opt == "--audit":
            _install_audit(opts.pop(0))
        elif opt == "--pause-after-read":
            _install_pause_after_read(opts.pop(0), Path(opts.pop(0)))
        elif opt == "--pause-before-read":
            _install_pause_after_read(opts.pop(0), Path(opts.pop(0)), before=True)
        else:
            raise SystemExit(f"unknown harness option {opt}")
    sys.argv = ["edge-agent", *args]
    from edge_agent.cli import main

    main()


def _install_audit(log_path: str) -> None:
    """Log [event, args] JSON lines to log_path for the audit events in AUDITED."""
    import threading

    out = open(log_path, "a", buffering=1, encoding="utf-8")
    lock = threading.Lock()

    def text(a: Any) -> Any:
        if isinstance(a, (bytes, os.PathLike)):
            a = os.fsdecode(a)
        if isinstance(a, (str, int, float, type(None))):
            return a
        return repr(a)[:200]

    def hook(event: str, eargs: tuple) -> None:
        if event in AUDITED:
            line = json.dumps([event, [text(a) for a in eargs]])
            with lock:
                out.write(line + "\n")

    sys.addaudithook(hook)


def read_audit(log: Path) -> list[tuple[str, list[Any]]]:
    if not log.exists():
        return []
    return [tuple(json.loads(line)) for line in log.read_text(encoding="utf-8").splitlines() if line.strip()]


if __name__ == "__main__":
    if len(sys.argv) >= 3 and sys.argv[1] == "harness":
        _harness_main(sys.argv[2:])
    elif len(sys.argv) >= 2 and sys.argv[1] == "hostile-table":
        sys.path.insert(0, str(HERE))
        from test_hostile_inputs import print_table  # noqa: E402

        sys.exit(print_table())
    else:
        print(__doc__)
        sys.exit(2)
