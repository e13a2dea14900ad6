"""Export the trained network to ONNX and prove the file computes what PyTorch computes.

The agent will only ever run the ONNX file, so every number after this stage
is about that file; the parity check is what licenses using the training
code's results for it at all.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from edge_agent.preprocess import Preprocessing, preprocess

from .model import EfficientNetLite0

INPUT, OUTPUT = "input", "logits"


def load_checkpoint(path: Path) -> tuple[EfficientNetLite0, dict]:
    ck = torch.load(path, map_location="cpu", weights_only=False)
    cfg = ck["config"]
    model = EfficientNetLite0(len(ck["labels"]), cfg["image_size"])
    model.load_state_dict(ck["model"])
    model.eval()
    return model, ck


def export_onnx(model: torch.nn.Module, image_size: int, path: Path, opset: int = 17) -> None:
    import onnx

    model.eval()
    x = torch.zeros(1, 3, image_size, image_size)
    torch.onnx.export(model, (x,), str(path), input_names=[INPUT], output_names=[OUTPUT],
                      opset_version=opset, dynamic_axes={INPUT: {0: "batch"}, OUTPUT: {0: "batch"}},
                      dynamo=False, do_constant_folding=True)
    m = onnx.load(str(path))
    onnx.checker.check_model(m, full_check=True)
    m.producer_name = "build_model"
    onnx.save(m, str(path))


def session(path: Path, threads: int = 0):
    import onnxruntime as ort

    so = ort.SessionOptions()
    if threads:
        so.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def run_onnx(sess, x: np.ndarray, batch: int = 32) -> np.ndarray:
    return np.concatenate([sess.run([OUTPUT], {INPUT: x[i:i + batch]})[0] for i in range(0, len(x), batch)])


def parity(model: torch.nn.Module, onnx_path: Path, images: list[np.ndarray], pre: Preprocessing) -> dict:
    """Max |logit difference| and top-1 agreement vs PyTorch, at batch sizes 1, 2 and 8."""
    x = np.stack([preprocess(im, pre) for im in images]).astype(np.float32)
    with torch.no_grad():
        ref = model(torch.from_numpy(x)).numpy()
    sess = session(onnx_path)
    out: dict = {"images": len(images), "batches": {}}
    worst = 0.0
    for b in (1, 2, 8):
        got = run_onnx(sess, x, b)
        diff = float(np.abs(got - ref).max())
        same = int((got.argmax(1) == ref.argmax(1)).sum())
        out["batches"][str(b)] = {"max_abs_diff": diff, "top1_identical": same}
        worst = max(worst, diff)
    out["max_abs_diff"] = worst
    out["top1_identical_all"] = all(v["top1_identical"] == len(images) for v in out["batches"].values())
    out["passed"] = worst <= 1e-4 and out["top1_identical_all"]
    return out
