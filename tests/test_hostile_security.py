"""Security: private files, no network, SQL only with parameters, no shell, no format strings from data.

The runtime checks use real agent processes: under a umask that would make
everything world-readable, with networking removed (`unshare -n`), and under
strace and a Python audit hook that record every socket. The static checks
read edge_agent's source, so a later change that builds SQL from values or
starts a shell fails here with the line that does it.
"""
from __future__ import annotations

import ast
import os
import re
import shutil
import socket
import stat
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from faults import (REPO, AgentProc, agent_env, distinct_images, outcome_count, outcome_rows, read_audit, wait_for,
                    write_images)

SRC = REPO / "edge_agent"


def scan(dirs: dict[str, Path], bundle: Path, prefix: list[str] = (), umask: int | None = None,
         harness: list[str] | None = None) -> subprocess.CompletedProcess:
    entry = [str(REPO / "tests" / "faults.py"), "harness", *harness, "--"] if harness else ["-m", "edge_agent"]
    return subprocess.run([*prefix, sys.executable, *entry, "scan", "--inbox", str(dirs["inbox"]), "--db",
                           str(dirs["db"]), "--model", str(bundle), "--workers", "1", "--threads", "1"],
                          env=agent_env(), capture_output=True, text=True, timeout=120,
                          preexec_fn=(lambda: os.umask(umask)) if umask is not None else None)


def mode(p: Path) -> int:
    return stat.S_IMODE(os.lstat(p).st_mode)


def test_database_and_quarantine_are_owner_only_even_with_umask_0(dirs, bundle_dir) -> None:
    write_images(dirs["inbox"], distinct_images(3, seed=81))
    (dirs["inbox"] / "bad.jpg").write_bytes(b"not an image at all, but text" * 5)
    r = scan(dirs, bundle_dir, umask=0)
    assert r.returncode == 0, r.stdout + r.stderr
    assert mode(dirs["db"]) == 0o600 and mode(dirs["db"].parent) == 0o700
    for suffix in ("-wal", "-shm"):  # SQLite gives its side files the database's mode
        side = Path(str(dirs["db"]) + suffix)
        if side.exists():
            assert mode(side) == 0o600, side.name
    assert mode(dirs["quarantine"]) == 0o700
    subdirs = [Path(d) / n for d, ns, _ in os.walk(dirs["quarantine"]) for n in ns]
    assert subdirs and all(mode(d) == 0o700 for d in subdirs), [(d.name, oct(mode(d))) for d in subdirs]
    assert len(outcome_rows(dirs["db"])) == 4


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("unshare") is None,
                    reason="needs root and unshare(1) to remove the network")
def test_scan_works_with_networking_blocked(dirs, bundle_dir) -> None:
    probe = subprocess.run(["unshare", "-n", "true"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip(f"unshare -n is not permitted here: {probe.stderr.decode().strip()}")
    write_images(dirs["inbox"], distinct_images(4, seed=82))
    r = scan(dirs, bundle_dir, prefix=["unshare", "-n"])
    assert r.returncode == 0, r.stdout + r.stderr
    assert outcome_count(dirs["db"]) == 4


def test_no_network_socket_is_ever_created(procs, dirs, bundle_dir, tmp_path) -> None:
    """`edge-agent run` under strace (system calls: OpenCV and onnxruntime included) and a Python audit hook,
    with systemd notification on: the one socket allowed is the AF_UNIX datagram to $NOTIFY_SOCKET."""
    name = f"edge-agent-test-{uuid.uuid4().hex}"
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind("\0" + name)
    strace = shutil.which("strace")
    trace_log, audit_log = tmp_path / "strace.log", tmp_path / "audit.jsonl"
    prefix = [strace, "-f", "-qq", "-o", str(trace_log), "-e", "trace=socket,connect,bind,sendto,sendmsg"] \
        if strace else []
    a = None
    try:
        write_images(dirs["inbox"], distinct_images(6, seed=83))
        a = AgentProc("run", ["--inbox", str(dirs["inbox"]), "--db", str(dirs["db"]), "--model", str(bundle_dir),
                              "--workers", "2", "--threads", "1"], tmp_path / "agent.log", prefix=prefix,
                      env=agent_env(NOTIFY_SOCKET="@" + name), harness=["--audit", str(audit_log)])
        procs.append(a.p)
        wait_for(lambda: outcome_count(dirs["db"]) == 6, what="the images", proc=a)
        a.term()
        assert a.wait(60) == 0, a.log()[-2000:]
    finally:
        notify.close()
        if a is not None and a.alive():
            a.kill()  # the agent itself, not only its tracer
    events = read_audit(audit_log)
    assert any(e == "open" for e, _ in events), "the audit hook recorded nothing; the test proves nothing"
    families = [args[1] for e, args in events if e == "socket.__new__"]
    assert families and set(families) == {int(socket.AF_UNIX)}, families
    assert not [e for e, _ in events if e in ("socket.getaddrinfo", "socket.gethostbyname", "socket.gethostbyaddr")]
    connects = [args for e, args in events if e in ("socket.connect", "socket.bind")]
    assert connects == [], connects
    if strace:
        calls = [line for line in trace_log.read_text().splitlines() if "socket(" in line]
        assert calls and all("AF_UNIX" in c for c in calls), calls  # never AF_INET/AF_INET6/AF_PACKET/...


# --- static checks of the source -----------------------------------------------------------------

SQL = re.compile(r"^\s*(SELECT|INSERT|UPDATE|DELETE|REPLACE|PRAGMA|CREATE|DROP|ALTER|BEGIN|WITH)\b"
                 r"|\b(WHERE|VALUES|FROM)\b")
# Every value interpolated into SQL text in edge_agent, with why it is safe. Anything else fails the test.
ALLOWED_SQL_PIECES = {
    "table": "asserted to be one of store.TABLES",
    "t": "iterates store.TABLES",
    "', '.join(cols)": "column names from the code's own row dicts",
    "', '.join(('?' for _ in cols))": "placeholders",
    "'OR IGNORE ' if or_ignore else ''": "a constant",
    "marks": "placeholders",
    "'sha256 IS NULL' if sha256 is None else 'sha256 = ?'": "constants",
    "' AND '.join(where)": "constant clauses built in query_results",
    "BUSY_TIMEOUT_MS": "an int constant",
    "int(WRITER_BUSY_TIMEOUT_MS)": "an int constant",
    "int(version)": "an int from MIGRATIONS (or read back from PRAGMA user_version)",
    "int(APPLICATION_ID)": "an int constant",
}


def _sources() -> list[tuple[Path, ast.Module]]:
    return [(p, ast.parse(p.read_text(), str(p))) for p in sorted(SRC.glob("*.py"))]


def _text(node: ast.AST) -> str:
    parts = []
    for v in getattr(node, "values", []):
        if isinstance(v, ast.Constant) and isinstance(v.value, str):
            parts.append(v.value)
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        parts.append(node.value)
    return "".join(parts)


def test_sql_is_built_only_with_parameters() -> None:
    found, bad = [], []
    for path, tree in _sources():
        for node in ast.walk(tree):
            where = f"{path.name}:{getattr(node, 'lineno', '?')}"
            if isinstance(node, ast.JoinedStr) and SQL.search(_text(node)):
                for v in node.values:
                    if isinstance(v, ast.FormattedValue):
                        src = ast.unparse(v.value)
                        found.append(src)
                        if src not in ALLOWED_SQL_PIECES:
                            bad.append(f"{where}: {{{src}}} interpolated into SQL")
            if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Mod) and \
                    SQL.search(_text(node.left)):
                bad.append(f"{where}: SQL built with %")
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "format" \
                    and SQL.search(_text(node.func.value)):
                bad.append(f"{where}: SQL built with str.format")
    assert found, "no SQL found; the check is broken"
    assert not bad, "\n".join(bad)


def _is_decode_worker_start(path: Path, call: ast.Call) -> bool:
    """The one process the agent starts: its own decode worker (its own interpreter, an argv list, no shell)."""
    return (path.name == "decode_worker.py" and ast.unparse(call.func) == "subprocess.Popen" and bool(call.args)
            and isinstance(call.args[0], ast.List) and [ast.unparse(e) for e in call.args[0].elts[1:3]] == ["'-c'", "_BOOT"])


def test_no_shell_no_eval_and_no_format_strings_from_data() -> None:
    bad = []
    for path, tree in _sources():
        for node in ast.walk(tree):
            where = f"{path.name}:{getattr(node, 'lineno', '?')}"
            if not isinstance(node, ast.Call):
                continue
            f = ast.unparse(node.func)
            if f in ("os.system", "os.popen", "eval", "exec", "os.execv", "os.execvp", "os.spawnv", "pty.spawn"):
                bad.append(f"{where}: {f}")
            if f.startswith("subprocess.") and path.name != "bench.py" and not _is_decode_worker_start(path, node):
                bad.append(f"{where}: {f} outside the benchmark tool")
            if any(k.arg == "shell" for k in node.keywords):
                bad.append(f"{where}: shell=")
            if isinstance(node.func, ast.Attribute) and node.func.attr in (
                    "debug", "info", "warning", "error", "exception", "critical", "log") and node.args:
                if node.func.attr == "log" and len(node.args) < 2:
                    continue  # np.log(x), math.log(x): not a logger call
                fmt = node.args[1 if node.func.attr == "log" else 0]
                if not (isinstance(fmt, ast.Constant) and isinstance(fmt.value, str)) and \
                        isinstance(node.func.value, ast.Name) and node.func.value.id == "log":
                    bad.append(f"{where}: log message is not a constant format ({ast.unparse(fmt)[:60]})")
            if isinstance(node.func, ast.Attribute) and node.func.attr in ("format", "format_map") and \
                    not isinstance(node.func.value, ast.Constant):
                bad.append(f"{where}: .format() on a computed string")
    assert not bad, "\n".join(bad)
