"""Decode images in worker processes under a hard memory ceiling, so no file can take the agent down.

The container checks (containers.py) refuse the structures known to make a
decoder allocate what the header does not announce, and OpenCV's own limits
refuse oversized images; but image decoders are large C libraries, and the
next trick will not be on anyone's list. So the whole check (decode.decode_image:
header, structure, decode, quality, preprocessing) runs in a separate Python
process whose address space is capped with RLIMIT_AS. An allocation beyond the
ceiling fails inside the worker (a clean `decode_memory` rejection, then a
fresh worker), a decoder that crashes kills only the worker (`crashed_decoder`),
one that hangs is killed after DECODE_TIMEOUT_S (`decode_timeout`). The agent,
its database and the other files carry on.

Wall time is a poor measure of a decoder that is working rather than stuck:
on a busy device the same decode takes longer, and a crafted file that is
merely expensive (thousands of progressive JPEG scans, hundreds of compressed
PNG text chunks) holds a worker for the whole wall-clock allowance. So each
decode also gets a processor-time ceiling (`decode_cpu_seconds`, 60 s): the
worker lowers its own soft RLIMIT_CPU to what it has used plus the ceiling
before each decode and lifts it after; past it the kernel sends SIGXCPU, whose
default action ends the worker wherever the decoder is (no Python handler
could interrupt a C loop), and the file is quarantined as `decode_timeout` at
once (no retry: the same bytes would use the same time). Core dumps are off in
the workers (SIGXCPU would write one of the worker's whole address space).

The ceiling is the worker's own address space once it is ready (interpreter,
numpy, OpenCV) plus what the largest accepted image needs: about 6 bytes per
pixel of `max_pixels` at the decoder's peak (measured: the 3-byte BGR result
plus the decoder's row and tile buffers), the largest accepted file, and a
margin. With the default 64 MP that is about 0.55 GB above the worker's start,
so one worker cannot push a 1 GB unit over its MemoryMax, and a 45 KB PNG
that claims a 4 GB chunk gets an error instead of 4 GB.

Each worker writes the file it is decoding into a small journal next to the
database (poison.py) just before decoding and clears it after: if the whole
agent dies during a decode anyway (an OOM kill of the unit, a power cut), the
next start knows which file was on the table. No fsync: the entry has to
survive the death of processes, which the page cache does; a power cut is not
caused by a file.

Each worker also reads what the decoder prints to stderr during each decode (decoder_messages.py): libjpeg
and libpng report damaged image data only there, and still return a picture.

The protocol is length-prefixed messages on the worker's stdin/stdout
(multiprocessing.connection framing): JSON metadata plus raw bytes, never
pickle, so a compromised decoder cannot make the agent run code. Cost per image
measured with `scripts/decode_throughput.py`; see docs/benchmarks.md.
"""
from __future__ import annotations

import collections
import contextlib
import json
import logging
import math
import mmap
import os
import queue
import resource
import signal
import struct
import subprocess
import sys
import threading
import time
from dataclasses import asdict
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import numpy as np

from .decode import Decoded, Header, Quality, QualityLimits, is_big, read_header
from .preprocess import Preprocessing
from .rejection import Rejected

log = logging.getLogger(__name__)

DECODE_TIMEOUT_S = 120.0  # a 64 MP PNG decodes in a few seconds on a Raspberry Pi 4; a decoder looping for ever
DECODE_CPU_S = 60.0  # Settings.decode_cpu_seconds' default: 64 MP at worst took 2.5 CPU s here (docs/decoding.md)
START_TIMEOUT_S = 120.0  # importing numpy and OpenCV on a cold SD card
BYTES_PER_PIXEL = 6
MARGIN_BYTES = 64 << 20
MAX_META = 1 << 20
PIPE_BYTES = 1 << 20
ATTEMPTS = 2  # a worker death is retried once in a fresh worker before the file is blamed
# The worker gets the agent's module search path verbatim: it imports the same edge_agent, numpy and OpenCV
# even when started through /proc/self/exe (see _interpreters), which knows nothing of the virtualenv.
_BOOT = ("import json, sys; sys.path[:] = json.loads(sys.argv[1]); from edge_agent.decode_worker import main; "
         "main(sys.argv[2])")


def _interpreters() -> list[str]:
    """The agent's own interpreter: by its name, and by /proc/self/exe, which still works where a folder on the
    name's path is not searchable for the service user (a virtualenv whose base Python lives in a private
    home) - the kernel opens the running binary directly."""
    return [sys.executable, "/proc/self/exe"] if os.path.exists("/proc/self/exe") else [sys.executable]


class DecoderUnavailable(RuntimeError):
    """No worker process could be started: screening cannot continue safely (files stay in the inbox)."""


def memory_budget(max_pixels: int, max_file_bytes: int) -> int:
    """Bytes of address space a worker may add beyond its start-up size: the largest accepted decode."""
    return BYTES_PER_PIXEL * int(max_pixels) + int(max_file_bytes) + MARGIN_BYTES


def _widen_pipe(fd: int) -> None:
    """1 MiB pipe buffers (Linux' unprivileged maximum) instead of 64 KiB: a camera JPEG crosses in a few
    writes instead of dozens of writer/reader switches."""
    try:
        import fcntl

        fcntl.fcntl(fd, getattr(fcntl, "F_SETPIPE_SZ", 1031), PIPE_BYTES)
    except OSError:
        pass


class _Died(Exception):
    def __init__(self, how: str) -> None:
        super().__init__(how)
        self.how = how


class DecodeWorker:
    """One worker process (started lazily, replaced when it dies); used by one thread at a time."""

    def __init__(self, slot: int, pre: Preprocessing, max_pixels: int, limits: QualityLimits, max_file_bytes: int,
                 journal: Path | None = None, budget_bytes: int | None = None,
                 timeout: float = DECODE_TIMEOUT_S, cpu_seconds: float = DECODE_CPU_S) -> None:
        self.slot = slot
        self.cpu_seconds = cpu_seconds
        self.journal = journal
        self.timeout = timeout
        self.max_file_bytes = max_file_bytes
        self.config = {"slot": slot, "pre": pre.to_dict(), "max_pixels": int(max_pixels), "limits": asdict(limits),
                       "journal": str(journal) if journal else None, "cpu_seconds": float(cpu_seconds),
                       "budget": int(budget_bytes if budget_bytes is not None
                                     else memory_budget(max_pixels, max_file_bytes))}
        self.max_pixels = int(max_pixels)
        self.proc: subprocess.Popen[bytes] | None = None
        self._send: Connection | None = None
        self._recv: Connection | None = None
        self._ready = False
        # The file's bytes in, the tensor out, through two shared memory files: one copy each way instead of
        # a pipe's chunked copies (measured: the pipe cost 0.5 ms of agent CPU per 3x192x192 tensor).
        self._memfd = -1
        self._memfd_size = 0
        self._outfd = -1
        self.info: dict[str, Any] = {}
        self.restarts = 0

    # --- life cycle ----------------------------------------------------------------------

    def start(self) -> None:
        """Start the process (returns at once; the first decode waits until it is ready)."""
        from . import runtime_env

        env = dict(os.environ)
        runtime_env.apply(env, self.max_pixels)
        env["MALLOC_ARENA_MAX"] = "2"  # a few threads; arenas per thread would only inflate the address space
        paths = json.dumps([str(Path(__file__).resolve().parent.parent), *sys.path])
        if self._memfd < 0 and hasattr(os, "memfd_create"):
            try:
                self._memfd = os.memfd_create("edge-agent-decode-in", os.MFD_CLOEXEC)
                self._outfd = os.memfd_create("edge-agent-decode-out", os.MFD_CLOEXEC)
            except OSError:
                self._memfd = self._outfd = -1
        self.config["memfd"], self.config["outfd"] = self._memfd, self._outfd
        err: OSError | None = None
        for exe in _interpreters():
            try:
                self.proc = subprocess.Popen([exe, "-c", _BOOT, paths, json.dumps(self.config)],
                                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, close_fds=True,
                                             pass_fds=(self._memfd, self._outfd) if self._memfd >= 0 else (),
                                             start_new_session=True)  # a terminal's Ctrl-C is for the agent
                break
            except OSError as e:
                err = e
        else:
            assert err is not None
            raise DecoderUnavailable(f"cannot start the decoder process ({err.strerror or err}: {err.filename}); "
                                     f"check that {sys.executable} can run and that the service may create "
                                     "processes") from None
        assert self.proc.stdin is not None and self.proc.stdout is not None
        _widen_pipe(self.proc.stdin.fileno())
        _widen_pipe(self.proc.stdout.fileno())
        self._send = Connection(os.dup(self.proc.stdin.fileno()), readable=False)
        self._recv = Connection(os.dup(self.proc.stdout.fileno()), writable=False)
        self.proc.stdin.close()
        self.proc.stdout.close()
        self._ready = False

    def _wait_ready(self) -> None:
        assert self._recv is not None
        try:
            if not self._recv.poll(START_TIMEOUT_S):
                raise _Died(f"not ready after {START_TIMEOUT_S:.0f} s")
            self.info = json.loads(self._recv.recv_bytes(MAX_META))
        except (EOFError, OSError) as e:
            raise _Died(self._exit_status() or str(e)) from None
        if not self.info.get("limited"):
            log.warning("decoder process %d runs without a memory ceiling (%s): an oversized image can exhaust "
                        "memory; allow setrlimit/prlimit64 for the service", self.info.get("pid", 0),
                        self.info.get("limit_error", "unknown reason"))
        self._ready = True

    def close(self) -> None:
        """Stop the process: closing its input ends its loop; a stuck one is killed."""
        for c in (self._send, self._recv):
            if c is not None:
                try:
                    c.close()
                except OSError:
                    pass
        self._send = self._recv = None
        if self.proc is not None:
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc = None

    def _kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
        self.close()

    def _exit_status(self) -> str:
        if self.proc is None:
            return ""
        try:
            rc = self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            rc = self.proc.wait()
        if rc < 0:
            try:
                return f"killed by {signal.Signals(-rc).name}"
            except ValueError:
                return f"killed by signal {-rc}"
        return f"exited with status {rc}"

    # --- decoding ------------------------------------------------------------------------

    def decode(self, data: bytes, sha256: str = "", name: str = "") -> Decoded:
        """decode.decode_image in the worker; raises Rejected (including crashed_decoder, decode_timeout,
        decode_memory) or DecoderUnavailable."""
        last = ""
        for attempt in range(ATTEMPTS):
            try:
                return self._decode_once(data, sha256, name)
            except _Died as d:
                last = d.how
                self._kill()
                self._clear_journal()  # this death is handled here; it must not count as a strike at the next start
                if "SIGXCPU" in d.how:  # the worker's processor-time ceiling: the same bytes would take as long again
                    log.warning("decoding %s used more than %g s of processor time; the decoder was stopped",
                                name or "a file", self.cpu_seconds)
                    raise Rejected("decode_timeout", f"decoding used more than {self.cpu_seconds:g} s of processor "
                                   "time (decode_cpu_seconds), so the decoder was stopped: the file is crafted to keep "
                                   "the decoder busy (or damaged) - re-export the image; if a genuine image needs "
                                   "more, raise decode_cpu_seconds") from None
                log.warning("the decoder process %s while decoding %s%s", d.how, name or "a file",
                            "; retrying in a fresh one" if attempt + 1 < ATTEMPTS else "")
            except _Timeout:
                self._kill()
                self._clear_journal()
                raise Rejected("decode_timeout", f"decoding did not finish within {self.timeout:.0f} s, so the "
                               "decoder was stopped: the file is damaged or crafted to stall the decoder - re-export "
                               "the image") from None
        raise Rejected("crashed_decoder", f"the image decoder process died while decoding this file ({last}), "
                       f"{ATTEMPTS} times in a row: the file is damaged or crafted to crash the decoder - re-export "
                       "the image; move it back into the inbox to retry")

    def _decode_once(self, data: bytes, sha256: str, name: str) -> Decoded:
        if self.proc is None:
            self.start()
            self.restarts += 1
        if not self._ready:
            try:
                self._wait_ready()
            except _Died as d:  # before it has seen any file: the environment's fault, never the image's
                self._kill()
                raise DecoderUnavailable(f"the decoder process {d.how} while starting, before it was given any "
                                         "image; check the agent's Python environment (numpy, OpenCV) and memory "
                                         "limits - files stay in the inbox") from None
        assert self._send is not None and self._recv is not None
        try:
            if self._memfd >= 0:
                if len(data) > self._memfd_size:
                    os.ftruncate(self._memfd, len(data))
                    self._memfd_size = len(data)
                os.pwrite(self._memfd, data, 0)
                self._send.send_bytes(json.dumps({"sha256": sha256, "name": name, "size": len(data)}).encode())
            else:
                self._send.send_bytes(json.dumps({"sha256": sha256, "name": name}).encode())
                self._send.send_bytes(data)
            if not self._recv.poll(self.timeout):
                raise _Timeout
            meta = json.loads(self._recv.recv_bytes(MAX_META))
            if meta.get("ok"):
                shape = tuple(int(x) for x in meta["shape"])
                nbytes = 4 * int(np.prod(shape))
                raw = os.pread(self._outfd, nbytes, 0) if meta.get("shared") else self._recv.recv_bytes(nbytes + 64)
                if len(raw) != nbytes:
                    raise _Died(f"returned {len(raw)} tensor bytes instead of {nbytes}")
                tensor = np.frombuffer(raw, np.float32).reshape(shape)
        except (EOFError, OSError) as e:
            raise _Died(self._exit_status() or str(e)) from None
        if meta.get("restart"):  # it hit its memory ceiling: a fresh process starts with a clean heap
            self.close()
        if not meta.get("ok"):
            raise Rejected(str(meta["code"]), str(meta["reason"]), bool(meta.get("maybe_incomplete")))
        q = meta["quality"]
        return Decoded(Header(*meta["header"]), int(meta["reduction"]), tensor,
                       Quality(q["sharpness"], q["brightness"], q["clipped_dark"], q["clipped_bright"],
                               tuple(q["issues"])))

    def _clear_journal(self) -> None:
        if self.journal is not None:
            try:
                os.truncate(f"{self.journal}.{self.slot}", 0)
            except OSError:
                pass


class _Timeout(Exception):
    pass


class DecodePool:
    """`n` workers shared by the agent's prep threads; at most one big non-JPEG decode at a time.

    Only one full-resolution decode of a big non-JPEG image runs at a time (the other formats cannot be
    decoded at reduced scale), which caps the sum of the workers' peaks well below the per-worker ceiling
    times n.
    """

    def __init__(self, n: int, pre: Preprocessing, max_pixels: int, limits: QualityLimits, max_file_bytes: int,
                 journal: Path | None = None, budget_bytes: int | None = None,
                 timeout: float = DECODE_TIMEOUT_S, cpu_seconds: float = DECODE_CPU_S) -> None:
        self.workers = [DecodeWorker(i, pre, max_pixels, limits, max_file_bytes, journal, budget_bytes, timeout,
                                     cpu_seconds) for i in range(n)]
        self._idle: queue.SimpleQueue[DecodeWorker] = queue.SimpleQueue()
        for w in self.workers:
            self._idle.put(w)
        self._big = threading.Semaphore(1)
        # Content hashes whose decode ended at a ceiling (time or memory) or killed the decoder twice: the same
        # bytes again (a file taken early at start-up is checked a second time after its quiet period; a copy
        # under another name) get the same answer without spending the ceiling again.
        self._costly: collections.OrderedDict[str, Rejected] = collections.OrderedDict()
        self._costly_lock = threading.Lock()

    def start(self) -> None:
        for w in self.workers:
            if w.proc is None:
                w.start()

    def decode(self, data: bytes, sha256: str = "", name: str = "") -> Decoded:
        if sha256:
            with self._costly_lock:
                known = self._costly.get(sha256)
            if known is not None:
                raise Rejected(known.code, known.reason, known.maybe_incomplete)
        w = self._idle.get()
        try:
            if _is_big(data):
                with self._big:
                    return w.decode(data, sha256, name)
            return w.decode(data, sha256, name)
        except Rejected as r:
            if sha256 and r.code in COSTLY:
                with self._costly_lock:
                    self._costly[sha256] = r
                    while len(self._costly) > 256:
                        self._costly.popitem(last=False)
            raise
        finally:
            self._idle.put(w)

    def close(self) -> None:
        for w in self.workers:
            w.close()
            for fd in (w._memfd, w._outfd):
                if fd >= 0:
                    os.close(fd)
            w._memfd = w._outfd = -1


COSTLY = ("decode_timeout", "decode_memory", "crashed_decoder")


def _is_big(data: bytes) -> bool:
    """Runs in the agent, on the header only (decode.is_big); the JPEG header walk is bounded (MAX_SEGMENTS
    segments, MAX_JPEG_FILL fill bytes: at most some 40 ms of the agent's CPU for a crafted file)."""
    try:
        return is_big(read_header(data))
    except (Rejected, struct.error, IndexError, ValueError):
        return False


# --- the worker process ------------------------------------------------------------------------

def _die_with_parent() -> None:
    """PR_SET_PDEATHSIG: a worker stuck in a decoder must not outlive a killed agent."""
    try:
        import ctypes

        libc = ctypes.CDLL(None)
        libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # pragma: no cover - not Linux/glibc
        pass


def _vm_size() -> int:
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    raise OSError("no VmSize in /proc/self/status")


def _limit_memory(budget: int) -> tuple[bool, str, int]:
    try:
        ceiling = _vm_size() + budget
        _soft, hard = resource.getrlimit(resource.RLIMIT_AS)
        if hard != resource.RLIM_INFINITY:
            ceiling = min(ceiling, hard)  # started under a lower limit already: keep it
        resource.setrlimit(resource.RLIMIT_AS, (ceiling, ceiling))
        return True, "", ceiling
    except (OSError, ValueError) as e:
        return False, str(e), 0


class _CpuCeiling:
    """Per-decode processor-time ceiling through the soft RLIMIT_CPU (see the module docstring)."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.ok = True
        try:
            resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # SIGXCPU must not dump a ~1 GB core
        except (OSError, ValueError):
            pass
        _soft, self.hard = resource.getrlimit(resource.RLIMIT_CPU)

    def arm(self) -> None:
        if not self.ok:
            return
        u = resource.getrusage(resource.RUSAGE_SELF)
        soft = math.ceil(u.ru_utime + u.ru_stime + self.seconds)
        if self.hard != resource.RLIM_INFINITY:
            soft = min(soft, self.hard)
        try:
            resource.setrlimit(resource.RLIMIT_CPU, (soft, self.hard))
        except (OSError, ValueError) as e:
            self.ok = False
            print(f"edge-agent decoder: no processor-time ceiling ({e}); only the wall-clock timeout applies",
                  file=sys.stderr, flush=True)

    def disarm(self) -> None:
        if self.ok:
            with contextlib.suppress(OSError, ValueError):
                resource.setrlimit(resource.RLIMIT_CPU, (self.hard, self.hard))


def _crash_hook(hits: list[int], name: str = "") -> None:
    """Test hook (as commit.crash_point): EDGE_AGENT_CRASH_AT=in_decode[:n] SIGKILLs the *agent* the n-th time
    this worker starts decoding, after the journal entry is written: the agent dying mid-decode.
    EDGE_AGENT_CRASH_AT=spin_in_decode[:TEXT] makes the worker compute for ever instead (for files whose name
    contains TEXT), as a decoder caught in a loop over crafted data would (it ends at the processor-time ceiling or
    the wall-clock timeout)."""
    spec = os.environ.get("EDGE_AGENT_CRASH_AT", "")
    point, _, nth = spec.partition(":")
    if point == "spin_in_decode" and nth in name:
        print("EDGE_AGENT_CRASH_AT=spin_in_decode: computing for ever (test hook)", file=sys.stderr, flush=True)
        x = 0
        while True:
            x = (x * 1103515245 + 12345) & 0xFFFFFFFF
    if point != "in_decode":
        return
    hits[0] += 1
    if hits[0] >= int(nth or 1):
        print(f"EDGE_AGENT_CRASH_AT={spec}: killing the agent now (test hook)", file=sys.stderr, flush=True)
        os.kill(os.getppid(), signal.SIGKILL)
        time.sleep(60)  # the parent-death signal ends this process


def main(config_json: str) -> None:
    """Worker loop: read (metadata, bytes), answer (metadata[, tensor]); exit at end of input."""
    cfg = json.loads(config_json)
    _die_with_parent()
    if os.getppid() == 1:  # the agent died before prctl took effect
        sys.exit(0)
    # The protocol owns the original stdin/stdout; fd 1 then points at stderr so that anything a library prints
    # lands in the agent's log instead of corrupting the message stream.
    rx = Connection(os.dup(0), writable=False)
    tx = Connection(os.dup(1), readable=False)
    os.dup2(2, 1)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    try:
        with open("/proc/self/oom_score_adj", "w", encoding="ascii") as f:
            f.write("1000")  # if memory runs out anyway, the kernel should pick a worker, not the agent
    except OSError:
        pass

    import cv2

    from .decode import decode_image
    from .decoder_messages import StderrCapture

    cv2.setNumThreads(1)  # parallelism comes from the worker processes; one thread keeps the ceiling predictable
    pre = Preprocessing.from_dict(cfg["pre"])
    limits = QualityLimits(**cfg["limits"])
    max_pixels = int(cfg["max_pixels"])
    warm = np.full((64, 64, 3), 128, np.uint8)  # load the codecs now, so their start-up is not in the budget
    for ext in (".jpg", ".png"):
        decode_image(cv2.imencode(ext, warm)[1].tobytes(), pre, max_pixels, limits)
    capture = StderrCapture()  # the decoder's warnings about damaged data, per decode (decoder_messages.py)
    limited, why, ceiling = _limit_memory(int(cfg["budget"]))
    cpu = _CpuCeiling(float(cfg.get("cpu_seconds", DECODE_CPU_S)))
    journal_fd = -1
    if cfg.get("journal"):
        journal_fd = os.open(f"{cfg['journal']}.{int(cfg['slot'])}", os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
        os.ftruncate(journal_fd, 0)
    try:
        tx.send_bytes(json.dumps({"ready": True, "pid": os.getpid(), "limited": limited, "limit_error": why,
                                  "ceiling": ceiling}).encode())
    except OSError:  # the agent stopped before we were ready (e.g. its model failed to load): nothing to do
        return
    hits = [0]
    while True:
        try:
            meta = json.loads(rx.recv_bytes(MAX_META))
            if "size" in meta:  # the bytes wait in the shared memory file, mapped read-only: no copy
                data: Any = mmap.mmap(int(cfg["memfd"]), int(meta["size"]), prot=mmap.PROT_READ) \
                    if int(meta["size"]) else b""
            else:
                data = rx.recv_bytes()
        except (EOFError, OSError):  # the agent closed our input: a clean stop, nothing on the table
            if journal_fd >= 0:
                with contextlib.suppress(OSError):
                    os.unlink(f"{cfg['journal']}.{int(cfg['slot'])}")
            return
        if journal_fd >= 0:
            entry = (json.dumps({"sha256": meta.get("sha256", ""), "name": meta.get("name", "")}) + "\n").encode()
            try:
                os.pwrite(journal_fd, entry, 0)
                os.ftruncate(journal_fd, len(entry))
            except OSError:  # the database's disk is full or read-only: the agent's fault, never the file's
                with contextlib.suppress(OSError):  # (dying here made every image a `crashed_decoder`); this
                    os.ftruncate(journal_fd, 0)     # one decode goes without its poison-pill journal entry
        reply: dict[str, Any]
        tensor = None
        cpu.arm()
        _crash_hook(hits, str(meta.get("name", "")))
        try:
            d = decode_image(data, pre, max_pixels, limits, capture)
            tensor = np.ascontiguousarray(d.tensor, np.float32)
            reply = {"ok": True, "header": [d.header.format, d.header.width, d.header.height],
                     "reduction": d.reduction, "shape": list(tensor.shape),
                     "quality": {**asdict(d.quality), "issues": list(d.quality.issues)}}
        except Rejected as r:
            reply = {"ok": False, "code": r.code, "reason": r.reason, "maybe_incomplete": r.maybe_incomplete,
                     "restart": r.code == "decode_memory"}
        except MemoryError:
            reply = {"ok": False, "code": "decode_memory", "restart": True,
                     "reason": "decoding this file needed more memory than the decoder is allowed; the file is "
                               "damaged or crafted - re-export the image, or send a smaller export"}
        except Exception as e:  # as in the agent's own prep stage: the file gets an outcome, the worker lives on
            reply = {"ok": False, "code": "internal_error", "restart": True,
                     "reason": f"the agent failed while checking this file ({type(e).__name__}: {e}); please "
                               "report this with the file; move it back into the inbox to retry"}
        cpu.disarm()
        if isinstance(data, mmap.mmap):
            with contextlib.suppress(BufferError):
                data.close()
        del data
        if journal_fd >= 0:
            os.ftruncate(journal_fd, 0)
        try:
            outfd = int(cfg.get("outfd", -1))
            if tensor is not None and outfd >= 0:
                view = memoryview(tensor).cast("B")
                os.ftruncate(outfd, max(os.fstat(outfd).st_size, len(view)))
                if os.pwrite(outfd, view, 0) != len(view):
                    raise OSError("short write of the tensor")
                reply["shared"] = True
            tx.send_bytes(json.dumps(reply).encode())
            if tensor is not None and not reply.get("shared"):
                tx.send_bytes(tensor.tobytes())
        except OSError:
            return
        if reply.get("restart"):
            return
