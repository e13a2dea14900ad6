"""`edge-agent bench`: system-level speed of the agent on real JPEGs, in one run.

For each image size - the source images as they are (the 200x150 HAM10000
examples) and copies the benchmark generates, upscaled to 1024x768 and
4000x3000 - the same N distinct files go through three measurements, each in
a fresh process of its own:

1. every stage alone (hash, decode+preprocess, inference, database write),
   each with the threads the agent gives it; the slower of decode+preprocess
   and inference sets the *bound* a pipelined agent can reach, and the CPU
   seconds all stages need per image set the *CPU bound* of the whole box;
2. a naive reference loop (per image: full-resolution cv2.imread, resize, the
   FP32 model at batch 1, one INSERT and one commit per row): the baseline;
3. `scan` itself: images/s, busy time per stage inside the scan, time from
   process launch to the first committed result, and peak RSS.

All numbers come from the same run on the same files, so the ratios
(x naive, fraction of the bound) hold on a noisy machine. Files must be
distinct (duplicates are detected by SHA-256), so every copy gets its index
drawn into the dark corner of the image and is re-encoded.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .benchstats import cpu_description, dumps, peak_rss_mb, percentile, ratio, table

DEFAULT_SIZES = "source,1024x768,4000x3000"
IMAGE_SUFFIXES = (".jpg", ".jpeg")
JPEG_QUALITY = 90
WORKER_TIMEOUT = 3600


# --- arithmetic (unit-tested) ------------------------------------------------------------

def parse_sizes(text: str) -> list[tuple[int, int] | None]:
    """'source,1024x768,4000x3000' -> [None, (1024, 768), (4000, 3000)]; None means the images as they are."""
    out: list[tuple[int, int] | None] = []
    for item in (t.strip().lower() for t in text.split(",")):
        if not item:
            continue
        if item in ("source", "orig", "original"):
            out.append(None)
            continue
        try:
            w, h = (int(v) for v in item.split("x"))
        except ValueError:
            raise ValueError(f"size {item!r} is not WIDTHxHEIGHT (e.g. 1024x768) or 'source'") from None
        if w < 32 or h < 32:
            raise ValueError(f"size {item!r} is too small to screen (at least 32x32)")
        out.append((w, h))
    if not out:
        raise ValueError("no sizes given")
    return out


def steady_rate(commits: Sequence[tuple[int, float]], skip: int) -> float:
    """Images/s between the first commit that brought the result count to `skip` or more and the last commit.

    `commits` are (results committed so far, time) per commit, in order. A
    commit finishes many results at once, so rates are taken between commits.
    Skipping the first `skip` results excludes start-up and the queue the
    workers filled while the model was loading; with too few commits for that,
    the rate runs from the first commit. NaN with fewer than two commits.
    """
    pts = sorted(commits)
    if len(pts) < 2:
        return float("nan")
    start = next((i for i, (done, _) in enumerate(pts) if done >= skip), len(pts) - 1)
    if start >= len(pts) - 1:
        start = 0
    (done_a, t_a), (done_b, t_b) = pts[start], pts[-1]
    return (done_b - done_a) / (t_b - t_a) if t_b > t_a else float("nan")


def stage_bound(rates: dict[str, float], stages: Sequence[str] = ("decode", "infer")) -> tuple[str | None, float]:
    """The slowest of `stages` measured alone (images/s): what a pipelined agent can reach at most."""
    have = [(rates[s], s) for s in stages if s in rates and rates[s] == rates[s] and rates[s] > 0]
    if not have:
        return None, float("nan")
    rate, stage = min(have)
    return stage, rate


def cpu_bound(cpu_per_image: dict[str, float], cores: int) -> float:
    """Images/s if every core were busy with useful stage work: cores / CPU-seconds per image, all stages."""
    total = sum(v for v in cpu_per_image.values() if v == v and v > 0)
    return cores / total if total > 0 else float("nan")


def per_image_ms(timing: dict[str, dict[str, float]], count: int) -> dict[str, float]:
    """Busy milliseconds per screened image for each stage of a scan (a StageTimes snapshot)."""
    return {k: 1000 * v["seconds"] / count if count else float("nan") for k, v in timing.items()}


def summarize(size: dict[str, Any]) -> dict[str, Any]:
    """Derived numbers for one image size: bound, fractions, ratio to the naive loop."""
    stages, scan, naive = size.get("stages") or {}, size.get("scan") or {}, size.get("naive") or {}
    rates = {k: v["images_per_s"] for k, v in stages.get("alone", {}).items()}
    cpu = {k: v["cpu_s_per_image"] for k, v in stages.get("alone", {}).items()}
    slowest, bound = stage_bound(rates)
    cb = cpu_bound(cpu, stages.get("cores", 1))
    achieved = scan.get("images_per_s", float("nan"))
    return {"bound_stage": slowest, "bound_images_per_s": bound, "fraction_of_bound": ratio(achieved, bound),
            "cpu_bound_images_per_s": cb, "fraction_of_cpu_bound": ratio(achieved, cb),
            "x_naive": ratio(achieved, naive.get("images_per_s"))}


def latency_ms(seconds: Sequence[float]) -> dict[str, float]:
    return {"p50_ms": 1000 * percentile(seconds, 50), "p95_ms": 1000 * percentile(seconds, 95),
            "p99_ms": 1000 * percentile(seconds, 99)}


# --- test images --------------------------------------------------------------------------

def add_comment(data: bytes, text: str) -> bytes:
    """The same JPEG with a COM segment after SOI: other bytes (so another SHA-256), same pixels."""
    if data[:2] != b"\xff\xd8":
        raise ValueError("not a JPEG")
    body = text.encode()
    return data[:2] + b"\xff\xfe" + struct.pack(">H", len(body) + 2) + body + data[2:]


def _mark(img: Any, index: int) -> Any:
    """Draw `index` as 16 black/white 8x8 blocks into the top-left corner (dermoscopes' dark vignette)."""
    out = img.copy()
    for bit in range(16):
        y, x = 8 * (bit // 4), 8 * (bit % 4)
        out[y:y + 8, x:x + 8] = 255 if (index >> bit) & 1 else 0
    return out


def source_images(folder: Path) -> list[Path]:
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
                   and not p.name.startswith("."))
    if not files:
        raise ValueError(f"no JPEG images in {folder}: pass --inbox DIR with real .jpg files")
    return files


def make_images(sources: Sequence[Path], size: tuple[int, int] | None, count: int, dest: Path,
                threads: int = 2) -> list[Path]:
    """`count` distinct JPEGs from `sources` (cycled), upscaled to `size` (None: as they are).

    Copy i of a source is the source itself when i < len(sources) and the size
    is unchanged; otherwise it carries its index drawn into the corner and is
    re-encoded. Cached in `dest` (reused while the sources and spec are the same).
    """
    import cv2

    spec = {"sources": [hashlib.sha256(p.read_bytes()).hexdigest() for p in sources], "size": list(size) if size else None,
            "count": count, "quality": JPEG_QUALITY, "version": 1}
    marker = dest / ".spec.json"
    names = [dest / f"img_{i:05d}.jpg" for i in range(count)]
    if marker.exists() and json.loads(marker.read_text()) == spec and all(p.exists() for p in names):
        return names
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    bases = []
    for p in sources:
        img = cv2.imread(str(p), cv2.IMREAD_COLOR)
        if img is None:
            raise ValueError(f"{p} cannot be decoded")
        if size is not None:
            img = cv2.resize(img, size, interpolation=cv2.INTER_CUBIC)
        bases.append(img)

    def one(i: int) -> None:
        k, j = i % len(sources), i // len(sources)
        if size is None and j == 0:
            shutil.copyfile(sources[k], names[i])
            return
        ok, buf = cv2.imencode(".jpg", _mark(bases[k], i), [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
        if not ok:
            raise RuntimeError("JPEG encoding failed")
        names[i].write_bytes(buf.tobytes())

    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max(1, threads)) as ex:
        list(ex.map(one, range(count)))
    digests = {hashlib.sha256(p.read_bytes()).hexdigest() for p in names}
    if len(digests) != count:
        raise RuntimeError(f"only {len(digests)} of {count} generated images are distinct")
    marker.write_text(json.dumps(spec))
    return names


def fill_inbox(files: Sequence[Path], inbox: Path, comment: str | None = None) -> None:
    """Hard-link (or copy) files into a fresh inbox; with `comment`, write distinct copies instead."""
    if inbox.exists():
        shutil.rmtree(inbox)
    inbox.mkdir(parents=True)
    for i, f in enumerate(files):
        dest = inbox / f"{i:05d}_{f.name}"
        if comment is not None:
            dest.write_bytes(add_comment(f.read_bytes(), f"{comment} {i}"))
            continue
        try:
            os.link(f, dest)
        except OSError:
            shutil.copyfile(f, dest)


# --- workers (each runs in its own process) ------------------------------------------------

def _settings(flags: dict[str, Any]) -> Any:
    from .config import load_settings

    return load_settings({k: (Path(v) if k in ("inbox", "db", "model", "processed_dir", "quarantine_dir") else v)
                          for k, v in flags.items() if v is not None}, environ={})


def _timed(fn: Callable[[], Any], items: int, min_seconds: float) -> tuple[dict[str, float], Any]:
    """Run fn() until at least min_seconds have passed (at least once): wall and CPU seconds per item."""
    passes, wall, cpu, out = 0, 0.0, 0.0, None
    while passes == 0 or wall < min_seconds:
        c0, t0 = time.process_time(), time.perf_counter()
        out = fn()
        wall += time.perf_counter() - t0
        cpu += time.process_time() - c0
        passes += 1
    n = items * passes
    return {"images_per_s": n / wall if wall else float("nan"), "ms_per_image": 1000 * wall / n,
            "cpu_s_per_image": cpu / n, "passes": passes}, out


def stages_worker(spec: dict[str, Any]) -> dict[str, Any]:
    """Each stage alone, over the same files, with the threads the agent gives it."""
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np

    from .bundle import load_bundle
    from .commit import COMMIT_ROWS
    from .decode import QualityLimits, decode_image
    from .infer import Engine
    from .intake import read_file
    from .pipeline import result_row
    from .signing import trust_from_settings
    from .store import Writer, now_iso
    from .triage import Policy, softmax, triage

    s = _settings(spec["flags"])
    files = [Path(p) for p in spec["files"]]
    n, min_s = len(files), spec["min_seconds"]
    bundle = load_bundle(s.model_path, trust_from_settings(s))
    policy = Policy.from_bundle(bundle, s.thresholds, s.threshold_override)
    limits = QualityLimits(s.min_sharpness, s.min_brightness, s.max_brightness, s.max_clipped_fraction)
    root = Path(os.path.realpath(files[0].parent))
    max_bytes = int(s.max_file_mb * 2**20)
    alone: dict[str, dict[str, float]] = {}
    with ThreadPoolExecutor(s.workers) as ex:
        alone["hash"], reads = _timed(lambda: list(ex.map(lambda p: read_file(p, root, max_bytes), files)), n, min_s)
        datas = [r.data for r in reads]
        alone["decode"], decoded = _timed(
            lambda: list(ex.map(lambda d: decode_image(d, bundle.preprocessing, s.max_pixels, limits), datas)), n, min_s)
    del datas, reads
    tensors = [d.tensor for d in decoded]
    engine = Engine(bundle, s.providers, s.threads)
    engine.load()
    bs = s.batch_size
    selected = [i for i in range(n) if s.spot_check_fraction > 0
                and int(hashlib.sha256(str(i).encode()).hexdigest()[:8], 16) / 0xFFFFFFFF < s.spot_check_fraction]
    probs_out: list[Any] = []

    def infer_pass() -> None:
        """What the agent's inference thread does per batch: stack, run, softmax, triage, spot-checks."""
        probs_out.clear()
        for i in range(0, n, bs):
            x = np.stack(tensors[i:i + bs]).astype(np.float32, copy=False)
            logits, _ = engine.infer(x)
            probs = softmax(logits, bundle.temperature)
            idx = [k for k in range(len(x)) if i + k in selected]
            if idx and engine.can_spot_check:
                engine.reference(x[idx])
            for k in range(len(x)):
                probs_out.append(triage(probs[k], policy, poor_quality=decoded[i + k].quality.poor))

    engine.infer(np.stack(tensors[:bs]))  # warm-up, both sessions: the scan's cost, not the first call's
    if engine.can_spot_check:
        engine.reference(np.stack(tensors[:1]))
    alone["infer"], _ = _timed(infer_pass, n, min_s)
    db_path = Path(spec["db"])
    writer = Writer(db_path, bundle.labels)
    passes = [0]

    def db_pass() -> None:
        """The writer thread's SQL per batch: INSERT the rows, commit, then record the moves, commit."""
        p = passes[0] = passes[0] + 1
        for start in range(0, n, COMMIT_ROWS):
            ids = []
            with writer.transaction():
                for i in range(start, min(n, start + COMMIT_ROWS)):
                    t, d = probs_out[i], decoded[i]
                    row = result_row(t, d, sha256=f"{p:08x}{i:056x}", processed_at=now_iso(),
                                     model_id=bundle.model_id, variant=engine.variant, fallback=False,
                                     label_name=t.label, spot_checked=False, spot_label=None, latency_ms=1.0,
                                     manifest_sha256=bundle.manifest_sha256, policy=policy.to_json())
                    ids.append(writer.insert_result(row | {
                        "original_name": files[i].name, "original_path": str(files[i]), "received_at": now_iso(),
                        "stored_path": f"/processed/{p}/{files[i].name}", "file_state": "pending"}))
            with writer.transaction():
                for rid in ids:
                    writer.set_file_state("results", rid, "moved")

    alone["db"], _ = _timed(db_pass, n, min_s)
    writer.close()
    return {"alone": alone, "cores": _cores(), "workers": s.workers, "threads": s.threads, "batch_size": bs,
            "variant": engine.variant, "peak_rss_mb": peak_rss_mb()}


def naive_worker(spec: dict[str, Any]) -> dict[str, Any]:
    """The baseline: what a straightforward script does, one image at a time."""
    import sqlite3

    import cv2
    import numpy as np
    import onnxruntime as ort

    from .infer import quiet_onnxruntime
    from .preprocess import Preprocessing, flatten_views, preprocess

    quiet_onnxruntime()  # the baseline's speed, without onnxruntime's per-load warnings in the report
    bundle = Path(spec["model"])
    manifest = json.loads((bundle / "manifest.json").read_text())
    pre = Preprocessing.from_dict(manifest["preprocessing"])
    sess = ort.InferenceSession(str(bundle / manifest["models"]["fp32"]["file"]), providers=["CPUExecutionProvider"])
    inp, outp = manifest["input"]["name"], manifest["output"]["name"]
    labels = manifest["labels"]
    conn = sqlite3.connect(spec["db"])
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA synchronous = FULL")
    conn.execute("CREATE TABLE results (id INTEGER PRIMARY KEY, path TEXT, processed_at TEXT, label TEXT, "
                 "confidence REAL, probabilities TEXT)")
    conn.commit()
    s = pre.input_size
    sess.run([outp], {inp: np.zeros((1, 3, s, s), np.float32)})  # warm-up
    files = spec["files"]
    times = []
    c0, t0 = time.process_time(), time.perf_counter()
    for path in files:
        t = time.perf_counter()
        bgr = cv2.imread(path, cv2.IMREAD_COLOR)
        x = flatten_views(preprocess(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB), pre)[None])
        logits = sess.run([outp], {inp: x})[0].mean(0)  # one row, or the mean of a multi-view bundle's views
        p = np.exp(logits - logits.max())
        p /= p.sum()
        k = int(p.argmax())
        conn.execute("INSERT INTO results (path, processed_at, label, confidence, probabilities) VALUES (?, ?, ?, ?, ?)",
                     (path, time.strftime("%Y-%m-%dT%H:%M:%S"), labels[k], float(p[k]),
                      json.dumps(dict(zip(labels, p.round(6).tolist())))))
        conn.commit()
        times.append(time.perf_counter() - t)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    conn.close()
    return {"images_per_s": len(files) / wall, "cpu_s_per_image": cpu / len(files), **latency_ms(times),
            "threads": "ort default", "peak_rss_mb": peak_rss_mb()}


def scan_worker(spec: dict[str, Any]) -> dict[str, Any]:
    """A real one-shot scan; the clock starts when the parent launched this process."""
    t_launch = spec["t_launch"]
    from . import cli  # noqa: F401 - `edge-agent scan` pays for these imports too
    from .commit import Outcome
    from .pipeline import Agent

    t_imported = time.time()
    s = _settings(spec["flags"])
    commits: dict[int, tuple[int, float]] = {}  # commit -> (results committed so far, when)
    first: list[float] = []
    results = [0]

    def on_outcome(o: Outcome) -> None:
        if o.kind == "result":
            if not first:
                first.append(time.time())
            results[0] += 1
            # Outcomes are finished on the writer thread right after their commit, which counted them in
            # timing.items["db"]: that count identifies the commit.
            key = agent.timing.items.get("db", 0)
            commits[key] = (results[0], commits.get(key, (0, time.perf_counter()))[1])

    agent = Agent(s, one_shot=True, on_outcome=on_outcome)
    c0, t0 = time.process_time(), time.perf_counter()
    code = agent.scan()
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    c = agent.counts
    timing = agent.timing.snapshot()
    skip = spec.get("skip", s.queue_max + s.batch_size)
    return {
        "exit_code": code, "results": c.results, "quarantined": c.quarantined, "duplicates": c.duplicates,
        "images_per_s": steady_rate(list(commits.values()), skip), "commits": len(commits), "scan_wall_s": wall,
        "scan_images_per_s": c.results / wall,
        "cpu_s_per_image": cpu / max(1, c.results), "first_result_s": (first[0] - t_launch) if first else float("nan"),
        "imports_s": t_imported - t_launch, "stage_ms": per_image_ms(timing, c.results),
        "mean_batch": ratio(timing.get("infer", {}).get("items", 0), timing.get("infer", {}).get("calls", 0)),
        "commit_rows": ratio(timing.get("db", {}).get("items", 0), len(commits)),
        "peak_rss_mb": peak_rss_mb(), "workers": s.workers, "threads": s.threads, "batch_size": s.batch_size,
        "queue_max": s.queue_max, "variant": agent.engine.variant if hasattr(agent, "engine") else None,
        "model_id": agent.bundle.model_id,
    }


WORKERS: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
    "stages": stages_worker, "naive": naive_worker, "scan": scan_worker}


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def _env_trust_flags() -> dict[str, Any]:
    """The bundle trust this process's environment configures, as flags for the workers (which run without
    EDGE_AGENT_* variables), so they accept exactly the bundle that `run` verified here."""
    from .signing import trust_from_environ

    trust = trust_from_environ()
    return {"trusted_keys": [str(k.path) for k in trust.keys if not k.project],
            "allow_unsigned_bundle": trust.allow_unsigned}


def _spawn(kind: str, spec: dict[str, Any], workdir: Path) -> dict[str, Any]:
    spec_file = workdir / f"{kind}.spec.json"
    spec = {**spec, "t_launch": time.time()}
    spec_file.write_text(json.dumps(spec))
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGE_AGENT_")}
    out = subprocess.run([sys.executable, "-m", "edge_agent.bench", kind, str(spec_file)], capture_output=True,
                         text=True, check=False, env=env, timeout=WORKER_TIMEOUT)
    if out.returncode:
        raise RuntimeError(f"benchmark worker {kind!r} failed (exit {out.returncode}):\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# --- the run --------------------------------------------------------------------------------

def run(inbox: Path, model: Path | None = None, count: int = 320, sizes: str = DEFAULT_SIZES, long: int = 0,
        workdir: Path | None = None, agent_flags: dict[str, Any] | None = None, naive: bool = True,
        min_seconds: float = 1.0, skip: int | None = None, log: Callable[[str], None] = lambda m: None) -> dict[str, Any]:
    """Measure everything; returns a JSON-ready dict (see `render`)."""
    from .bundle import default_bundle_path, load_bundle

    model = Path(model or default_bundle_path()).resolve()
    bundle = load_bundle(model)
    sources = source_images(Path(inbox))
    workdir = Path(workdir or Path(tempfile.gettempdir()) / "edge-agent-bench").resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    flags = {k: v for k, v in (agent_flags or {}).items() if v is not None}
    cores = _cores()
    import cv2

    first = cv2.imread(str(sources[0]))
    src_label = f"{first.shape[1]}x{first.shape[0]}" if first is not None else "source"
    result: dict[str, Any] = {
        "bundle": str(model), "model_id": bundle.model_id, "primary": bundle.primary, "input_size": bundle.input_size,
        "cpu": cpu_description(), "cores": cores, "count": count, "sources": str(inbox), "agent_flags": flags,
        "python": sys.version.split()[0], "versions": _versions(), "sizes": [],
    }
    for size in parse_sizes(sizes):
        label = src_label if size is None else f"{size[0]}x{size[1]}"
        log(f"{label}: preparing {count} distinct JPEGs")
        files = make_images(sources, size, count, workdir / "images" / f"{label}-{count}", threads=cores)
        run_dir = workdir / "run"
        entry: dict[str, Any] = {"size": label, "count": count}
        base = {"model": str(model), **_env_trust_flags(), **flags}
        if os.path.exists(run_dir):
            shutil.rmtree(run_dir)
        run_dir.mkdir()
        log(f"{label}: stages alone")
        entry["stages"] = _spawn("stages", {"files": [str(f) for f in files], "db": str(run_dir / "stages.db"),
                                            "min_seconds": min_seconds, "flags": base}, run_dir)
        if naive:
            log(f"{label}: naive reference loop")
            entry["naive"] = _spawn("naive", {"files": [str(f) for f in files], "db": str(run_dir / "naive.db"),
                                              "model": str(model)}, run_dir)
        log(f"{label}: agent scan")
        entry["scan"] = _scan(files, run_dir, base, skip)
        entry.update(summarize(entry))
        result["sizes"].append(entry)
        shutil.rmtree(run_dir, ignore_errors=True)
    if long:
        log(f"long scan: {long} images, all sizes mixed")
        sets = [make_images(sources, size, count, workdir / "images" /
                            f"{src_label if size is None else f'{size[0]}x{size[1]}'}-{count}", threads=cores)
                for size in parse_sizes(sizes)]
        mixed = [sets[i % len(sets)][(i // len(sets)) % count] for i in range(long)]
        run_dir = workdir / "run"
        shutil.rmtree(run_dir, ignore_errors=True)
        run_dir.mkdir()
        result["long"] = {"count": long, "sizes": [e["size"] for e in result["sizes"]],
                          **_scan(mixed, run_dir, {"model": str(model), **_env_trust_flags(), **flags}, skip,
                                  comment="edge-agent bench copy")}
        shutil.rmtree(run_dir, ignore_errors=True)
    return result


def _scan(files: Sequence[Path], run_dir: Path, flags: dict[str, Any], skip: int | None,
          comment: str | None = None) -> dict[str, Any]:
    inbox = run_dir / "inbox"
    fill_inbox(files, inbox, comment=comment)
    spec: dict[str, Any] = {"flags": {**flags, "inbox": str(inbox), "db": str(run_dir / "agent.db"),
                                      "processed_dir": str(run_dir / "processed"),
                                      "quarantine_dir": str(run_dir / "quarantine"), "log_level": "WARNING"}}
    if skip is not None:
        spec["skip"] = skip
    out = _spawn("scan", spec, run_dir)
    if out["results"] != len(files):
        raise RuntimeError(f"the scan screened {out['results']} of {len(files)} images "
                           f"({out['quarantined']} quarantined, {out['duplicates']} duplicates)")
    return out


def _versions() -> dict[str, str]:
    out = {}
    for mod in ("onnxruntime", "cv2", "numpy"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception:  # pragma: no cover - informational only
            out[mod] = "?"
    return out


# --- output --------------------------------------------------------------------------------

THROUGHPUT = [("size", "images", ""), ("count", "N", "d"), ("agent", "agent img/s", ".1f"),
              ("whole", "whole scan", ".1f"),
              ("naive", "naive img/s", ".1f"), ("x_naive", "x naive", ".2f"), ("bound_stage", "slowest stage", ""),
              ("bound", "bound img/s", ".1f"), ("fraction", "of bound", ".0%"), ("cpu_bound", "CPU bound img/s", ".1f"),
              ("cpu_fraction", "of CPU bound", ".0%"), ("first", "1st result s", ".2f"), ("rss", "peak RSS MB", ".0f")]
STAGES = [("size", "images", ""), ("where", "measured", ""), ("hash", "hash", ".2f"), ("decode", "decode+pre", ".2f"),
          ("infer", "inference", ".2f"), ("db", "db write", ".2f"), ("move", "move", ".2f"),
          ("wall", "wall ms/img", ".2f"), ("cpu", "CPU ms/img", ".2f")]


def _rows(result: dict[str, Any]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    thr, stg = [], []
    for e in result["sizes"]:
        scan, naive, stages = e["scan"], e.get("naive") or {}, e["stages"]
        thr.append({"size": e["size"], "count": e["count"], "agent": scan["images_per_s"],
                    "whole": scan["scan_images_per_s"],
                    "naive": naive.get("images_per_s"), "x_naive": e["x_naive"], "bound_stage": e["bound_stage"],
                    "bound": e["bound_images_per_s"], "fraction": e["fraction_of_bound"],
                    "cpu_bound": e["cpu_bound_images_per_s"], "cpu_fraction": e["fraction_of_cpu_bound"],
                    "first": scan["first_result_s"], "rss": scan["peak_rss_mb"]})
        alone = stages["alone"]
        stg.append({"size": e["size"], "where": "each stage alone", **{k: v["ms_per_image"] for k, v in alone.items()},
                    "wall": sum(v["ms_per_image"] for v in alone.values()),
                    "cpu": 1000 * sum(v["cpu_s_per_image"] for v in alone.values())})
        stg.append({"size": "", "where": "agent scan (busy)", **scan["stage_ms"], "wall": 1000 / scan["images_per_s"],
                    "cpu": 1000 * scan["cpu_s_per_image"]})
        if naive:
            stg.append({"size": "", "where": "naive loop", "wall": 1000 / naive["images_per_s"],
                        "cpu": 1000 * naive["cpu_s_per_image"]})
    return thr, stg


def render(result: dict[str, Any]) -> str:
    scan0 = result["sizes"][0]["scan"] if result["sizes"] else {}
    head = (f"system-level benchmark: {result['model_id']} ({result['primary']} primary, input "
            f"{result['input_size']}) from {result['bundle']}\n"
            f"CPU: {result['cpu']}, {result['cores']} cores; agent: workers={scan0.get('workers')} "
            f"threads={scan0.get('threads')} batch={scan0.get('batch_size')} queue_max={scan0.get('queue_max')}; "
            f"onnxruntime {result['versions'].get('onnxruntime')}, OpenCV {result['versions'].get('cv2')}\n"
            "agent img/s: steady state of `scan` (whole scan: start-up included); bound: slowest of "
            "decode+preprocess and inference measured alone (each with the agent's threads); CPU bound: cores / "
            "CPU-seconds of all stages per image\n")
    thr, stg = _rows(result)
    text = head + "\n" + table(thr, THROUGHPUT)
    text += ("\n\nper-stage time, ms per image ('agent scan' is the busy time of each stage summed over its threads, "
             "so stages that overlap add up to more than the wall time)\n")
    text += table(stg, STAGES)
    if "long" in result:
        lg = result["long"]
        text += (f"\n\nlong scan: {lg['count']} images ({', '.join(lg['sizes'])} mixed): {lg['images_per_s']:.1f} img/s "
                 f"steady, {lg['scan_images_per_s']:.1f} img/s over the whole scan ({lg['scan_wall_s']:.1f} s), "
                 f"first result {lg['first_result_s']:.2f} s after launch, peak RSS {lg['peak_rss_mb']:.0f} MB")
    return text


def main_worker(argv: list[str]) -> None:
    kind, spec_file = argv[0], argv[1]
    spec = json.loads(Path(spec_file).read_text())
    res = WORKERS[kind](spec)
    sys.stdout.write(json.dumps(res, default=float) + "\n")


if __name__ == "__main__":
    main_worker(sys.argv[1:])

