"""Process environment the native libraries read once, at load time: set before onnxruntime or OpenCV load.

Imported first by `edge_agent/__init__.py`, so every entry point (the CLI, the
decode worker, the benchmark, a test importing one module) gets it before any
`import cv2` or `import onnxruntime` can run.

* ONNX Runtime's official builds collect telemetry (1DS): on the first
  `import onnxruntime` they create ~/.cache/Microsoft/DeveloperTools/.onnxruntime/
  with a persistent device id and an event database (OS, Python path, model
  file names, execution providers) meant for upload. The product promises that
  nothing about a patient or a site leaves the device and that it keeps nothing
  it does not need. `ORT_DISABLE_TELEMETRY=1` before the library initializes is
  what stops it (measured with onnxruntime 1.32: `disable_telemetry_events()`
  alone still creates both files, because they are written at import). It is
  forced, not defaulted: an inherited `ORT_DISABLE_TELEMETRY=0` must not turn
  it back on. infer.py also calls `disable_telemetry_events()`.
* OpenCV reads its decoder size limits (OPENCV_IO_MAX_IMAGE_PIXELS/WIDTH/HEIGHT)
  once, when the library loads. Here they get the default `max_pixels`; the
  decode worker process (decode_worker.py) is started with the configured one.
"""
from __future__ import annotations

import os
from collections.abc import MutableMapping

DEFAULT_MAX_PIXELS = 64_000_000  # config.Settings.max_pixels' default
MIN_SIDE = 32  # decode.MIN_SIDE: the longest side an accepted image can have is max_pixels / MIN_SIDE
OPENCV_MAX_SIDE = 1 << 20  # OpenCV's own default width/height limit


def opencv_limits(max_pixels: int) -> dict[str, str]:
    """OpenCV's decoder limits for the agent's pixel limit: no image the agent would refuse gets allocated."""
    side = max(MIN_SIDE, min(OPENCV_MAX_SIDE, max_pixels // MIN_SIDE))
    return {"OPENCV_IO_MAX_IMAGE_PIXELS": str(int(max_pixels)), "OPENCV_IO_MAX_IMAGE_WIDTH": str(side),
            "OPENCV_IO_MAX_IMAGE_HEIGHT": str(side)}


def apply(environ: MutableMapping[str, str] = os.environ, max_pixels: int | None = None) -> None:
    """Set the variables; `max_pixels` given: OpenCV's limits are forced to it, else defaulted."""
    environ["ORT_DISABLE_TELEMETRY"] = "1"
    environ.setdefault("OPENCV_LOG_LEVEL", "ERROR")
    for k, v in opencv_limits(max_pixels or DEFAULT_MAX_PIXELS).items():
        if max_pixels is None:
            environ.setdefault(k, v)
        else:
            environ[k] = v
