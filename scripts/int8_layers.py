"""Where do two CPUs' INT8 answers part? Run an INT8 QDQ model layer by layer on both and compare.

Each compute node (Conv, Add/Sum, ReduceMean, ...) becomes its own small model, from the quantized
tensors it reads to the quantized tensor it writes (ONNX Runtime fuses it exactly as in the whole
model: DequantizeLinear -> Conv -> QuantizeLinear becomes QLinearConv), and every platform feeds it
the same inputs, recorded once. A layer whose outputs differ is where the arithmetic differs; a whole
model that differs while no layer does is being fed different inputs by its float parts.

  python scripts/int8_layers.py prepare MODEL.onnx DIR [--images X.npy] [--count 4]   # needs onnx
  python scripts/int8_layers.py run DIR        # on each platform (onnxruntime + numpy only)
  python scripts/int8_layers.py compare DIR    # after `run` on both: res-x86_64.npz, res-aarch64.npz

With scripts/aarch64-e2e.sh's arm64 root (KEEP=1 keeps it), `run` there is
  chroot ROOT /opt/edge-agent/venv/bin/python /tmp/int8_layers.py run /tmp/DIR
(docs/aarch64.md has what it found for the default model).
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

import numpy as np


def prepare(model_path: Path, out: Path, images: Path | None, count: int) -> int:
    import onnx
    import onnxruntime as ort
    from onnx import utils

    out.mkdir(parents=True, exist_ok=True)
    m = onnx.load(str(model_path))
    g = m.graph
    inits = {i.name for i in g.initializer}
    producer = {o: n for n in g.node for o in n.output}
    consumers: dict[str, list] = {}
    for n in g.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    x_name = g.input[0].name
    shape = [d.dim_value or 1 for d in g.input[0].type.tensor_type.shape.dim]
    x = np.load(images)[:count].astype(np.float32) if images else \
        np.random.default_rng(0).uniform(-1, 1, [count, *shape[1:]]).astype(np.float32)
    probe = onnx.load(str(model_path))
    quantized = [n.output[0] for n in g.node if n.op_type == "QuantizeLinear"]
    for q in quantized:
        probe.graph.output.append(onnx.helper.make_tensor_value_info(q, onnx.TensorProto.UINT8, None))
    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(probe.SerializeToString(), so, providers=["CPUExecutionProvider"])
    values = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, {x_name: x})))
    values[x_name] = x
    layers = []
    for n in g.node:
        if n.op_type in ("QuantizeLinear", "DequantizeLinear", "Identity"):
            continue
        ins = [i for i in n.input if i == x_name or (i in producer and producer[i].op_type == "DequantizeLinear"
                                                     and producer[i].input[0] not in inits)]
        ins = [i if i == x_name else producer[i].input[0] for i in ins]
        if not ins or any(i not in values for i in ins):
            continue  # reads a float tensor another float node made: judged as part of that node's layer
        outs = [c.output[0] for c in consumers.get(n.output[0], []) if c.op_type == "QuantizeLinear"] or [n.output[0]]
        k = len(layers)
        utils.extract_model(str(model_path), str(out / f"{k}.onnx"), ins, outs[:1])
        np.savez(out / f"{k}.npz", **{f"in{j}": values[i] for j, i in enumerate(ins)})
        layers.append({"k": k, "node": n.name, "op": n.op_type, "inputs": ins, "output": outs[0]})
    (out / "layers.json").write_text(json.dumps(layers, indent=1))
    print(f"{len(layers)} layers of {model_path} written to {out} ({count} images)")
    return 0


def run(out: Path) -> int:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    res = {}
    for layer in json.loads((out / "layers.json").read_text()):
        sess = ort.InferenceSession(str(out / f"{layer['k']}.onnx"), so, providers=["CPUExecutionProvider"])
        d = np.load(out / f"{layer['k']}.npz")
        res[str(layer["k"])] = sess.run(None, {n: d[f"in{j}"] for j, n in enumerate(layer["inputs"])})[0]
    np.savez(out / f"res-{platform.machine()}.npz", **res)
    print(f"{len(res)} layers run on {platform.machine()}, onnxruntime {ort.__version__}")
    return 0


def compare(out: Path) -> int:
    a, b = np.load(out / "res-x86_64.npz"), np.load(out / "res-aarch64.npz")
    differ = 0
    layers = json.loads((out / "layers.json").read_text())
    for layer in layers:
        x, y = a[str(layer["k"])], b[str(layer["k"])]
        d = np.abs(x.astype(np.float64) - y.astype(np.float64))
        if d.max() > 0:
            differ += 1
            print(f"{layer['op']:<10} {layer['node']:<44} {x.dtype} differs in {int((d > 0).sum())}/{d.size}, max {d.max():.3g}")
    print(f"{len(layers) - differ} of {len(layers)} layers bit-identical on x86-64 and aarch64")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare")
    p.add_argument("model", type=Path)
    p.add_argument("dir", type=Path)
    p.add_argument("--images", type=Path, help="preprocessed inputs (N x C x H x W float32 .npy); default: random")
    p.add_argument("--count", type=int, default=4)
    sub.add_parser("run").add_argument("dir", type=Path)
    sub.add_parser("compare").add_argument("dir", type=Path)
    a = ap.parse_args()
    if a.cmd == "prepare":
        return prepare(a.model, a.dir, a.images, a.count)
    return run(a.dir) if a.cmd == "run" else compare(a.dir)


if __name__ == "__main__":
    sys.exit(main())
