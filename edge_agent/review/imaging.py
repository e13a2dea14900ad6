"""Decoding for the review app, in a separate process under a memory ceiling - never in the web process.

The images in the processed folder passed the agent's checks, but the review
app still treats every file as untrusted: it is a long-running process that
holds the database, and a decoder bug must not take it down or let a file run
code in it. So `decode_batch` starts `python -m edge_agent.review.imaging`,
caps its address space (RLIMIT_AS, as decode_worker.py does), and gets back,
per file, exactly what the agent computes (decode.decode_image: the same
checks and the same preprocess.preprocess_bgr tensor the model saw) plus a
small JPEG thumbnail. Protocol: JSON lines in, files written into a private
temporary folder out; never pickle.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..preprocess import Preprocessing

TIMEOUT_S = 120.0
THUMB_SIDE = 360
MAX_FILE_BYTES = 100 << 20


@dataclass
class Decoded:
    tensor: np.ndarray | None  # 3xSxS float32 (preprocess contract), None if it failed
    thumbnail: bytes | None  # JPEG
    error: str = ""
    region: tuple[float, float, float, float] | None = None  # decode.Decoded.region: where a lesion crop was cut


def decode_batch(files: list[tuple[int, Any]], pre: Preprocessing, max_pixels: int = 64_000_000,
                 want_tensor: bool = True, want_thumb: bool = True, budget_bytes: int | None = None) -> dict[int, Decoded]:
    """Decode already-opened image files (key -> OpenedFile, see files.open_inside) in one worker process.

    The file descriptors are passed to the worker (pass_fds), so it reads exactly the files the web process
    checked, never a path that could have been swapped. A worker that dies (memory ceiling, decoder crash)
    costs the image it was on ("could not be decoded") and the rest are retried in a fresh worker."""
    out: dict[int, Decoded] = {}
    todo = list(files)
    budget = budget_bytes if budget_bytes is not None else 6 * max_pixels + MAX_FILE_BYTES + (64 << 20)
    while todo:
        with tempfile.TemporaryDirectory(prefix="edge-review-") as tmp:
            jobs = [{"key": k, "fd": f.fd} for k, f in todo]
            cfg = {"pre": pre.to_dict(), "max_pixels": int(max_pixels), "out": tmp, "budget": int(budget),
                   "tensor": want_tensor, "thumb": want_thumb, "thumb_side": THUMB_SIDE}
            try:
                proc = subprocess.run([sys.executable, "-m", "edge_agent.review.imaging", json.dumps(cfg)],
                                      input="\n".join(json.dumps(j) for j in jobs).encode(), capture_output=True,
                                      timeout=TIMEOUT_S, pass_fds=[f.fd for _, f in todo], check=False)
                died = proc.returncode != 0
            except subprocess.TimeoutExpired:
                died = True
            done_keys = set()
            for k, _ in todo:
                meta = Path(tmp) / f"{k}.json"
                if not meta.exists():
                    continue
                done_keys.add(k)
                m = json.loads(meta.read_text())
                tensor = np.load(Path(tmp) / f"{k}.npy", allow_pickle=False) if m.get("tensor") else None
                thumb = (Path(tmp) / f"{k}.jpg").read_bytes() if m.get("thumb") else None
                region = m.get("region")
                out[k] = Decoded(tensor, thumb, str(m.get("error", "")),
                                 tuple(float(v) for v in region) if region else None)
            rest = [(k, f) for k, f in todo if k not in done_keys]
            if rest and died:  # the first unfinished one killed the worker: blame it, retry the others
                k0 = rest[0][0]
                out[k0] = Decoded(None, None, "the image could not be decoded (the decoder process ran out of "
                                  "memory, crashed or timed out)")
                rest = rest[1:]
            elif rest:
                for k, _ in rest:
                    out[k] = Decoded(None, None, "the decoder process gave no answer for this image")
                rest = []
            todo = rest
    for _, f in files:
        try:
            os.close(f.fd)
        except OSError:
            pass
    return out


def _worker(cfg: dict[str, Any]) -> None:
    import resource

    import cv2

    from ..decode import QualityLimits, decode_image, decode_pixels, read_header, reduction_for
    from ..rejection import Rejected

    start = 0
    try:
        with open("/proc/self/statm") as fh:
            start = int(fh.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        pass
    limit = start + int(cfg["budget"])
    try:
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    except (ValueError, OSError):
        pass
    pre = Preprocessing.from_dict(cfg["pre"])
    out = Path(cfg["out"])
    limits = QualityLimits(min_sharpness=0.0, min_brightness=0.0, max_brightness=255.0, max_clipped_fraction=1.0)
    for line in sys.stdin.read().splitlines():
        job = json.loads(line)
        key, fd = int(job["key"]), int(job["fd"])
        meta: dict[str, Any] = {}
        try:
            with os.fdopen(fd, "rb") as fh:
                data = fh.read(MAX_FILE_BYTES + 1)
            if len(data) > MAX_FILE_BYTES:
                raise Rejected("too_large", "the file is larger than the review app decodes")
            if cfg["tensor"]:
                d = decode_image(data, pre, int(cfg["max_pixels"]), limits, want_region=True)
                np.save(out / f"{key}.npy", d.tensor, allow_pickle=False)
                meta["tensor"] = True
                if d.region is not None:
                    meta["region"] = list(d.region)
            if cfg["thumb"]:
                h = read_header(data)
                if h.width * h.height > int(cfg["max_pixels"]):
                    raise Rejected("too_many_pixels", "the image is larger than max_pixels")
                side = int(cfg["thumb_side"])
                bgr = decode_pixels(data, h, reduction_for(h, side))
                scale = side / max(bgr.shape[:2])
                if scale < 1:
                    bgr = cv2.resize(bgr, (max(1, round(bgr.shape[1] * scale)), max(1, round(bgr.shape[0] * scale))),
                                     interpolation=cv2.INTER_AREA)
                ok, buf = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, 85])
                if ok:
                    (out / f"{key}.jpg").write_bytes(buf.tobytes())
                    meta["thumb"] = True
        except Rejected as r:
            meta["error"] = r.reason
        except MemoryError:
            meta["error"] = "the image needs more memory than the review app's decoder may use"
        except Exception as e:  # noqa: BLE001 - one bad file gives one error line, the others go on
            meta["error"] = f"cannot decode the image ({type(e).__name__}: {str(e)[:200]})"
        tmp = out / f"{key}.json.tmp"
        tmp.write_text(json.dumps(meta))
        os.replace(tmp, out / f"{key}.json")


if __name__ == "__main__":  # pragma: no cover - run as the worker process
    _worker(json.loads(sys.argv[1]))
