#!/usr/bin/env python3
"""Run the agent's workload under the seccomp rules of edge-agent.service.

`systemd-analyze security` only scores the unit; it cannot tell whether
onnxruntime, numpy, OpenCV, sqlite3 and watchdog still work once
`SystemCallFilter=` and `MemoryDenyWriteExecute=yes` are applied. This script
applies the same two seccomp filters that systemd installs for those directives
(without needing systemd as PID 1, root, or a container) and then either

  * runs a built-in workload (default): decode example images with OpenCV,
    run ONNX models with onnxruntime (default thread pool, so it pins threads
    with sched_setaffinity, and an explicit 2-thread pool), write SQLite in WAL
    mode, start and stop a watchdog inotify observer, open an AF_UNIX datagram
    socket (sd_notify), plus negative controls proving the filters are active
    (a W+X mmap, setuid() and nice() must fail with EPERM); or
  * runs any command given after `--` (the filters survive execve), e.g.
        python systemd/sandbox_check.py -- .venv/bin/edge-agent scan --inbox /tmp/in --db /tmp/r.db --after keep

The allowed system calls are computed from the unit's own SystemCallFilter=
lines, expanded with `systemd-analyze syscall-filter`, so the check follows the
unit. Needs libseccomp (libseccomp.so.2, present wherever systemd is) and
systemd-analyze. Exit status 0 = workload passed; 77 = cannot run here (skip).

What it does not reproduce: the namespaces (PrivateNetwork=, ProtectSystem=,
PrivateUsers=, ...), RestrictAddressFamilies= and the device policy. Those are
covered by docs/install.md's on-device checklist.
"""
from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import errno
import mmap
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
SKIP = 77

SCMP_ACT_ALLOW = 0x7FFF0000
SCMP_CMP_MASKED_EQ = 7
SHM_EXEC = 0o100000


def SCMP_ACT_ERRNO(e: int) -> int:
    return 0x00050000 | (e & 0xFFFF)


class ScmpArgCmp(ctypes.Structure):
    _fields_ = [("arg", ctypes.c_uint), ("op", ctypes.c_int),
                ("datum_a", ctypes.c_uint64), ("datum_b", ctypes.c_uint64)]


# --------------------------------------------------------------------------- unit parsing

def unit_settings(unit: Path) -> dict[str, list[str]]:
    """[Service] key -> list of values in file order (no drop-ins, no line continuations needed)."""
    out: dict[str, list[str]] = {}
    section = None
    for raw in unit.read_text().splitlines():
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        if section == "Service" and "=" in line:
            k, v = line.split("=", 1)
            out.setdefault(k.strip(), []).append(v.strip())
    return out


def syscall_groups() -> dict[str, list[str]]:
    text = subprocess.run(["systemd-analyze", "syscall-filter", "--no-pager"], check=True,
                          capture_output=True, text=True).stdout
    groups: dict[str, list[str]] = {}
    cur = None
    for line in text.splitlines():
        s = line.strip()
        if not s or s.startswith("#"):
            continue
        if not line.startswith((" ", "\t")) and s.startswith("@"):
            cur = s.split()[0]
            groups[cur] = []
        elif cur is not None:
            groups[cur].append(s.split()[0])
    return groups


def expand(names: list[str], groups: dict[str, list[str]]) -> set[str]:
    out: set[str] = set()
    for n in names:
        if n.startswith("@"):
            if n not in groups:
                raise SystemExit(f"unknown syscall group {n}")
            out |= expand(groups[n], groups)
        else:
            out.add(n)
    return out


def allowed_syscalls(settings: dict[str, list[str]]) -> set[str]:
    """Apply SystemCallFilter= lines the way systemd does: the first line decides allow-
    or deny-list mode; later lines add to (or, with ~, remove from) the set."""
    lines = settings.get("SystemCallFilter", [])
    if not lines or lines[0].startswith("~"):
        raise SystemExit("unit has no allow-list SystemCallFilter=; nothing to check")
    groups = syscall_groups()
    allowed: set[str] = set()
    for v in lines:
        deny = v.startswith("~")
        names = v.lstrip("~").split()
        names = [n.split(":", 1)[0] for n in names]  # drop per-call errno overrides
        s = expand(names, groups)
        allowed = allowed - s if deny else allowed | s
    # systemd always allows these so that a filtered process can still exit and be signalled
    # (src/shared/seccomp-util.c: the "@default" baseline is added in allow-list mode).
    allowed |= expand(["@default"], groups)
    return allowed


# --------------------------------------------------------------------------- seccomp

def load_libseccomp():
    name = ctypes.util.find_library("seccomp") or "libseccomp.so.2"
    try:
        lib = ctypes.CDLL(name, use_errno=True)
    except OSError:
        return None
    lib.seccomp_init.restype = ctypes.c_void_p
    lib.seccomp_init.argtypes = [ctypes.c_uint32]
    lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
    lib.seccomp_rule_add_array.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int,
                                           ctypes.c_uint, ctypes.POINTER(ScmpArgCmp)]
    lib.seccomp_load.argtypes = [ctypes.c_void_p]
    lib.seccomp_release.argtypes = [ctypes.c_void_p]
    return lib


def _rule(lib, ctx, action: int, name: str, cmps: list[tuple[int, int, int]] = ()) -> bool:
    nr = lib.seccomp_syscall_resolve_name(name.encode())
    if nr < 0:  # not a system call on this architecture (e.g. mmap2 on x86_64)
        return False
    arr = (ScmpArgCmp * max(1, len(cmps)))(*[ScmpArgCmp(a, SCMP_CMP_MASKED_EQ, m, v) for a, m, v in cmps])
    r = lib.seccomp_rule_add_array(ctx, action, nr, len(cmps), arr)
    if r < 0:
        raise OSError(-r, f"seccomp_rule_add({name}): {os.strerror(-r)}")
    return True


def install_filters(allowed: set[str], error: int, mdwe: bool) -> int:
    """Returns the number of system calls allowed. Raises OSError when seccomp is unavailable."""
    lib = load_libseccomp()
    if lib is None:
        raise OSError(errno.ENOSYS, "libseccomp not found")
    if mdwe:
        # 1. MemoryDenyWriteExecute=yes, as systemd's seccomp_memory_deny_write_execute()
        # implements it: no mapping that is writable and executable at once, no mprotect()
        # to executable at all, no executable SysV shared memory.
        W, X = mmap.PROT_WRITE, mmap.PROT_EXEC
        ctx = lib.seccomp_init(SCMP_ACT_ALLOW)
        e = SCMP_ACT_ERRNO(errno.EPERM)
        _rule(lib, ctx, e, "mmap", [(2, W | X, W | X)])
        _rule(lib, ctx, e, "mmap2", [(2, W | X, W | X)])
        _rule(lib, ctx, e, "mprotect", [(2, X, X)])
        _rule(lib, ctx, e, "pkey_mprotect", [(2, X, X)])
        _rule(lib, ctx, e, "shmat", [(2, SHM_EXEC, SHM_EXEC)])
        r = lib.seccomp_load(ctx)
        lib.seccomp_release(ctx)
        if r < 0:
            raise OSError(-r, f"seccomp_load (MDWE): {os.strerror(-r)}")
    # 2. SystemCallFilter= allow list (last, as systemd does: the seccomp() call that
    # loads it is not on the list itself); anything else fails with SystemCallErrorNumber=.
    ctx = lib.seccomp_init(SCMP_ACT_ERRNO(error))
    if not ctx:
        raise OSError(errno.ENOMEM, "seccomp_init failed")
    n = sum(_rule(lib, ctx, SCMP_ACT_ALLOW, s) for s in sorted(allowed))
    r = lib.seccomp_load(ctx)
    lib.seccomp_release(ctx)
    if r < 0:
        raise OSError(-r, f"seccomp_load: {os.strerror(-r)}")
    return n


# --------------------------------------------------------------------------- workload

def tiny_models(folder: Path) -> list[Path]:
    """A small conv net as FP32 and as INT8 QDQ (the two variants a bundle carries).
    Needs onnx (test/build extra); runs before the filters are installed."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    rng = np.random.default_rng(0)
    w1 = numpy_helper.from_array(rng.normal(0, 0.1, (8, 3, 3, 3)).astype(np.float32), "w1")
    b1 = numpy_helper.from_array(np.zeros(8, np.float32), "b1")
    w2 = numpy_helper.from_array(rng.normal(0, 0.1, (8, 7)).astype(np.float32), "w2")
    b2 = numpy_helper.from_array(np.zeros(7, np.float32), "b2")
    nodes = [
        helper.make_node("Conv", ["input", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1], strides=[2, 2]),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("GlobalAveragePool", ["r1"], ["g"]),
        helper.make_node("Flatten", ["g"], ["f"]),
        helper.make_node("Gemm", ["f", "w2", "b2"], ["logits"]),
    ]
    graph = helper.make_graph(nodes, "tiny",
                              [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3, 64, 64])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 7])],
                              [w1, b1, w2, b2])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    fp32 = folder / "model.fp32.onnx"
    onnx.save(model, fp32)

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter([{"input": rng.normal(0, 1, (1, 3, 64, 64)).astype(np.float32)} for _ in range(4)])

        def get_next(self):
            return next(self.it, None)

    int8 = folder / "model.int8.onnx"
    import logging
    logging.getLogger().setLevel(logging.ERROR)  # quiet "consider pre-processing" advice
    quantize_static(str(fp32), str(int8), Reader(), quant_format=QuantFormat.QDQ,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    return [fp32, int8]


def expect_eperm(what: str, fn) -> None:
    try:
        fn()
    except OSError as e:
        if e.errno == errno.EPERM:
            print(f"  ok   {what}: blocked (EPERM)")
            return
        raise AssertionError(f"{what}: failed with {e!r}, expected EPERM") from e
    raise AssertionError(f"{what}: was allowed; the filter is not active")


def raw_syscall(name: str, *args: int) -> int:
    """The bare system call, bypassing libc wrappers (glibc's setuid() would broadcast to
    every thread and abort the process when the kernel refuses it)."""
    lib = load_libseccomp()
    nr = lib.seccomp_syscall_resolve_name(name.encode())
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    r = libc.syscall(ctypes.c_long(nr), *[ctypes.c_long(a) for a in args])
    if r < 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))
    return r


def workload(models: list[Path], images: list[Path], mdwe: bool) -> None:
    import sqlite3
    import socket
    import threading
    import time

    import cv2
    import numpy as np
    import onnxruntime as ort
    from watchdog.events import FileSystemEventHandler
    from watchdog.observers import Observer

    print(f"  ok   imported numpy {np.__version__}, opencv {cv2.__version__}, onnxruntime {ort.__version__}")
    size = None
    for model in models:
        for threads in (0, 2):  # 0: ORT default pool (pins threads), 2: explicit
            so = ort.SessionOptions()
            so.intra_op_num_threads = threads
            sess = ort.InferenceSession(str(model), so, providers=["CPUExecutionProvider"])
            inp = sess.get_inputs()[0]
            size = inp.shape[-1] if isinstance(inp.shape[-1], int) else 64
            x = np.random.default_rng(0).normal(0, 1, (2, 3, size, size)).astype(np.float32)
            y = sess.run(None, {inp.name: x})[0]
            assert y.shape[0] == 2 and np.isfinite(y).all()
        print(f"  ok   onnxruntime CPU inference: {model.name}")
    for img in images:
        data = np.frombuffer(img.read_bytes(), np.uint8)
        bgr = cv2.imdecode(data, cv2.IMREAD_COLOR)
        assert bgr is not None, img
        small = cv2.resize(bgr, (size or 64, size or 64), interpolation=cv2.INTER_AREA)
        assert small.shape[2] == 3
    print(f"  ok   OpenCV decoded and resized {len(images)} image(s)")
    with tempfile.TemporaryDirectory() as d:
        db = sqlite3.connect(Path(d) / "results.db")
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("CREATE TABLE r (id INTEGER PRIMARY KEY, p REAL)")
        with db:
            db.executemany("INSERT INTO r (p) VALUES (?)", [(0.5,)] * 10)
        db.close()
        print("  ok   sqlite3 WAL write")
        seen = threading.Event()

        class H(FileSystemEventHandler):
            def on_any_event(self, event):
                seen.set()

        obs = Observer()
        obs.schedule(H(), d, recursive=False)
        obs.start()
        (Path(d) / "new.jpg").write_bytes(b"x")
        ok = seen.wait(10)
        obs.stop()
        obs.join(10)
        assert ok, "watchdog saw no event"
        print(f"  ok   watchdog {type(obs).__name__} saw a new file")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.close()
    print("  ok   AF_UNIX datagram socket (sd_notify)")
    # negative controls: the filters really are in force
    if mdwe:
        expect_eperm("mmap(PROT_WRITE|PROT_EXEC)",
                     lambda: mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC))
    expect_eperm("setresuid(-1, -1, -1) (@privileged)", lambda: raw_syscall("setresuid", -1, -1, -1))
    expect_eperm("setpriority() via os.nice (@resources)", lambda: os.nice(1))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--unit", type=Path, default=HERE / "edge-agent.service")
    ap.add_argument("--model", type=Path, action="append", default=[],
                    help="ONNX file to run (repeatable). Default: edge_agent/bundle/*.onnx if present, "
                         "else two tiny generated models (needs onnx)")
    ap.add_argument("--images", type=Path, default=HERE.parent / "examples" / "images")
    ap.add_argument("cmd", nargs=argparse.REMAINDER, help="-- COMMAND ARGS... to run under the filters instead")
    a = ap.parse_args()

    settings = unit_settings(a.unit)
    mdwe = settings.get("MemoryDenyWriteExecute", ["no"])[-1] in ("yes", "true", "1", "on")
    err_name = settings.get("SystemCallErrorNumber", ["EPERM"])[-1]
    error = getattr(errno, err_name, None)
    if error is None:
        print(f"SystemCallErrorNumber={err_name} is not an errno name; the check needs one", file=sys.stderr)
        return 2
    try:
        allowed = allowed_syscalls(settings)
    except (FileNotFoundError, subprocess.CalledProcessError) as e:
        print(f"SKIP: systemd-analyze unavailable: {e}", file=sys.stderr)
        return SKIP

    cmd = a.cmd[1:] if a.cmd[:1] == ["--"] else a.cmd
    tmp = tempfile.TemporaryDirectory()
    models = a.model
    if not cmd and not models:
        bundle = HERE.parent / "edge_agent" / "bundle"
        models = sorted(bundle.glob("*.onnx"))
        if not models:
            models = tiny_models(Path(tmp.name))
    images = sorted(p for p in a.images.glob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))[:4]

    try:
        n = install_filters(allowed, error, mdwe)
    except OSError as e:
        print(f"SKIP: cannot install seccomp filters here: {e}", file=sys.stderr)
        return SKIP
    print(f"seccomp: {n} system calls allowed (SystemCallFilter= of {a.unit.name}), "
          f"others -> {err_name}; MemoryDenyWriteExecute={'yes' if mdwe else 'no'}")
    if cmd:
        sys.stdout.flush()
        os.execvp(cmd[0], cmd)
    workload(models, images, mdwe)
    print("sandbox check: OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
