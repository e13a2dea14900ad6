"""`build-model bench`: model-level speed of PyTorch FP32 eager, ORT FP32 and ORT INT8, in one run.

Each (engine, batch) is measured in its own subprocess so that its peak RSS
belongs to it alone, and all of them on the same preprocessed real images, one
after the other, so that ratios hold on a noisy machine.
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from edge_agent.benchstats import cpu_description, file_mb, latency_summary, peak_rss_mb, ratio, table
from edge_agent.preprocess import flatten_views

from .errors import BuildError

ENGINES = ("torch-fp32", "ort-fp32", "ort-int8")


def load_inputs(bundle: Path, images: Path | None, count: int = 16) -> np.ndarray:
    import cv2

    from edge_agent.preprocess import Preprocessing, preprocess

    manifest = json.loads((bundle / "manifest.json").read_text())
    pre = Preprocessing.from_dict(manifest["preprocessing"])
    folder = images or Path(__file__).resolve().parent.parent / "examples" / "images"
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    if not files:
        raise BuildError(f"no images in {folder}: pass --images DIR with JPEG/PNG files")
    xs = [preprocess(cv2.cvtColor(cv2.imread(str(f)), cv2.COLOR_BGR2RGB), pre) for f in files]
    while len(xs) < count:
        xs += xs
    return np.stack(xs[:count]).astype(np.float32)


def worker(bundle: Path, engine: str, batch: int, iters: int, warmup: int, threads: int,
           images: Path | None, checkpoint: Path | None) -> dict:
    x = load_inputs(bundle, images)
    manifest = json.loads((bundle / "manifest.json").read_text())
    # A batch of `batch` images: with a multi-view bundle that is batch x views model inputs, so images/s
    # counts what the agent screens, not what the model runs.
    xb = flatten_views(np.concatenate([x] * (batch // len(x) + 1))[:batch])
    if engine == "torch-fp32":
        import torch

        from .model import EfficientNetLite0

        torch.set_num_threads(threads)
        arch = manifest.get("training", {}).get("config", {}).get("arch", "lite0")
        model = EfficientNetLite0(len(manifest["labels"]), manifest["preprocessing"]["input_size"], arch=arch)
        if checkpoint:
            model.load_state_dict(torch.load(checkpoint, map_location="cpu", weights_only=False)["model"])
        model.eval()
        t = torch.from_numpy(xb)
        size = sum(p.numel() * 4 for p in model.state_dict().values()) / 1e6

        def call() -> None:
            with torch.inference_mode():
                model(t)
    else:
        import onnxruntime as ort

        path = bundle / manifest["models"][engine.split("-")[1]]["file"]
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        size = file_mb(path)

        feed = {manifest["input"]["name"]: xb}

        def call() -> None:
            sess.run(None, feed)
    for _ in range(warmup):
        call()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        call()
        times.append(time.perf_counter() - t0)
    return {"engine": engine, "threads": threads, "model_mb": size, "peak_rss_mb": peak_rss_mb(),
            **latency_summary(times, batch)}


def run(bundle: Path, iters: int = 100, warmup: int = 10, threads: int | None = None, batches=(1, 8),
        engines=ENGINES, images: Path | None = None, checkpoint: Path | None = None) -> dict:
    threads = threads or os.cpu_count() or 1
    rows = []
    for batch in batches:
        for engine in engines:
            # find_spec, not import: a torch import here would inflate this process's RSS, and with it what
            # getrusage reports for every worker it starts (ru_maxrss survives exec).
            if engine == "torch-fp32" and importlib.util.find_spec("torch") is None:
                continue
            cmd = [sys.executable, "-m", "build_model.bench", str(bundle), engine, str(batch), str(iters), str(warmup),
                   str(threads), str(images or ""), str(checkpoint or "")]
            out = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if out.returncode:
                raise BuildError(f"benchmark worker {engine} batch {batch} failed:\n{out.stderr[-2000:]}")
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    for batch in batches:
        by = {r["engine"]: r for r in rows if r["batch"] == batch}
        for r in by.values():
            r["x_vs_ort_fp32"] = ratio(r["images_per_s"], by.get("ort-fp32", {}).get("images_per_s"))
            r["x_vs_torch"] = ratio(r["images_per_s"], by.get("torch-fp32", {}).get("images_per_s"))
    return {"bundle": str(bundle), "threads": threads, "iterations": iters, "warmup": warmup,
            "cpu": cpu_description(), "rows": rows}


COLUMNS = [("engine", "engine", ""), ("batch", "batch", "d"), ("threads", "threads", "d"),
           ("p50_ms", "p50 ms", ".2f"), ("p95_ms", "p95 ms", ".2f"), ("p99_ms", "p99 ms", ".2f"),
           ("images_per_s", "images/s", ".1f"), ("x_vs_ort_fp32", "x ORT-FP32", ".2f"), ("x_vs_torch", "x torch", ".2f"),
           ("model_mb", "model MB", ".1f"), ("peak_rss_mb", "peak RSS MB", ".0f")]


def render(result: dict) -> str:
    head = (f"model-level benchmark: {result['bundle']}\nCPU: {result['cpu']}, {result['threads']} threads, "
            f"{result['iterations']} timed iterations after {result['warmup']} warm-up, each engine in its own process\n"
            "ORT: CPUExecutionProvider, all graph optimisations, intra-op threads as stated; PyTorch: eager, "
            "inference_mode; same real images, preprocessed as the manifest says\n")
    return head + table(result["rows"], COLUMNS)


if __name__ == "__main__":
    b, engine, batch, iters, warmup, threads, images, ckpt = sys.argv[1:9]
    res = worker(Path(b), engine, int(batch), int(iters), int(warmup), int(threads),
                 Path(images) if images else None, Path(ckpt) if ckpt else None)
    print(json.dumps(res))
