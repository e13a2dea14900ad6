"""Export the trained network to ONNX and prove the file computes what PyTorch computes.

The agent will only ever run the ONNX file, so every number after this stage
is about that file; the parity check is what licenses using the training
code's results for it at all.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from edge_agent.preprocess import Preprocessing, flatten_views, preprocess

from .model import EfficientNetLite0

INPUT, OUTPUT = "input", "logits"


def load_checkpoint(path: Path, image_size: int | None = None) -> tuple[EfficientNetLite0, dict]:
    """The trained network, built for `image_size` (default: the size it was trained at; the
    TF-SAME padding depends on it, the weights do not)."""
    ck = torch.load(path, map_location="cpu", weights_only=False)
    cfg = ck["config"]
    model = EfficientNetLite0(len(ck["labels"]), image_size or cfg["image_size"], arch=cfg.get("arch", "lite0"))
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
    basic_optimize(path)
    m = fold_pads(onnx.load(str(path)))
    onnx.checker.check_model(m, full_check=True)
    m.producer_name = "build_model"
    onnx.save(m, str(path))


def basic_optimize(path: Path) -> None:
    """ONNX Runtime's hardware-independent graph optimisations (constant folding, BN fusion, ...), in place.

    The exporter leaves F.pad's pad amounts as a small computed subgraph;
    folding turns them into constants that `fold_pads` can then absorb.
    """
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    tmp = path.with_suffix(".basic.onnx")
    so.optimized_model_filepath = str(tmp)
    ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    tmp.replace(path)


def fold_pads(m):
    """Merge zero-valued constant Pad nodes into the Conv they feed (ONNX Conv takes asymmetric pads).

    PyTorch cannot express TF's asymmetric SAME padding inside a convolution, so
    the export has Pad -> Conv pairs at the stride-2 layers. One Conv with
    `pads=[top, left, bottom, right]` computes the same thing, runs faster, and
    leaves no extra tensor for INT8 calibration to quantize.
    """
    from onnx import helper, numpy_helper

    g = m.graph
    inits = {t.name: t for t in g.initializer}
    consts = {n.output[0]: n for n in g.node if n.op_type == "Constant"}
    consumers: dict[str, list] = {}
    for n in g.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)

    def value(name: str):
        if name in inits:
            return numpy_helper.to_array(inits[name])
        if name in consts:
            return numpy_helper.to_array(consts[name].attribute[0].t)
        return None

    drop = []
    for pad in [n for n in g.node if n.op_type == "Pad"]:
        users = consumers.get(pad.output[0], [])
        mode = next((helper.get_attribute_value(a) for a in pad.attribute if a.name == "mode"), b"constant")
        pads = value(pad.input[1]) if len(pad.input) > 1 else None
        fill = value(pad.input[2]) if len(pad.input) > 2 and pad.input[2] else 0
        if (len(users) != 1 or users[0].op_type != "Conv" or mode != b"constant" or pads is None
                or (fill is not None and np.any(fill != 0)) or len(pads) != 8 or np.any(pads[[0, 1, 4, 5]] != 0)):
            continue
        conv = users[0]
        old = next((list(helper.get_attribute_value(a)) for a in conv.attribute if a.name == "pads"), [0, 0, 0, 0])
        new = [old[0] + int(pads[2]), old[1] + int(pads[3]), old[2] + int(pads[6]), old[3] + int(pads[7])]
        for a in list(conv.attribute):
            if a.name in ("pads", "auto_pad"):
                conv.attribute.remove(a)
        conv.attribute.append(helper.make_attribute("pads", new))
        conv.input[0] = pad.input[0]
        drop.append(pad)
    for n in drop:
        g.node.remove(n)
    used = {n.domain for n in g.node}
    for op in [o for o in m.opset_import if o.domain and o.domain not in used]:
        m.opset_import.remove(op)  # ORT's optimiser lists every domain it knows
    return m


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
    x = flatten_views(np.stack([preprocess(im, pre) for im in images])).astype(np.float32)  # each view a model input
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
