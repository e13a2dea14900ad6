"""Quantization-aware fine-tuning: it must round where and how ONNX Runtime's INT8 model rounds.

If the simulation drifted from ORT (another rounding point, another range
rule), QAT would train the network for noise it never meets and the gate
would still fail; these tests compare against a real ORT QDQ model.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from build_model.export import export_onnx
from build_model.model import build_model
from build_model.qat import ActQuant, calibrate, float_pass, onnx_ranges, prepare
from build_model.quantize import FP32_FIRST_CONVS, Candidate, preprocess_model, quantize
from tests.build_fixtures import model_inputs

SIZE = 64


def images(n: int, seed: int) -> np.ndarray:
    return model_inputs(n, seed, SIZE)


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp("qat")
    torch.manual_seed(0)
    float_model = build_model(7, SIZE).eval()
    export_onnx(float_model, SIZE, tmp / "fp32.onnx")
    calib = images(32, 1)
    sim = build_model(7, SIZE, pretrained=False)
    sim.load_state_dict(float_model.state_dict())
    prepare(sim, FP32_FIRST_CONVS, residual_percentile=99.9)
    calibrate(sim, torch.from_numpy(calib))
    prep = preprocess_model(tmp / "fp32.onnx", tmp / "fp32.prep.onnx")
    int8 = quantize(prep, tmp / "int8.onnx", calib, Candidate("MinMax", False), onnx_ranges(sim))
    return float_model, sim, tmp / "fp32.onnx", int8


def test_prepare_adds_no_state_so_checkpoints_export_like_any_other() -> None:
    m = build_model(7, SIZE, pretrained=False)
    keys = set(m.state_dict())
    prepare(m, FP32_FIRST_CONVS)
    assert set(m.state_dict()) == keys
    assert not m.training  # frozen BatchNorm, no dropout


def test_one_quantizer_per_tensor_that_ort_quantizes(models) -> None:
    import onnx

    _, sim, _, int8 = models
    q_nodes = [n for n in onnx.load(str(int8)).graph.node if n.op_type == "QuantizeLinear"]
    assert sum(isinstance(m, ActQuant) for m in sim.modules()) == len(q_nodes)


def ort_rounded_tensors(int8: Path, x: np.ndarray) -> list[np.ndarray]:
    """Every activation ORT's QDQ model rounds, after its Q/DQ pair, in graph order (no fusions: the QDQ
    semantics themselves)."""
    import onnx
    import onnxruntime as ort

    m = onnx.load(str(int8))
    consts = {i.name for i in m.graph.initializer}
    q_out = {n.output[0] for n in m.graph.node if n.op_type == "QuantizeLinear" and n.input[0] not in consts}
    names: list[str] = []
    for n in m.graph.node:
        if n.op_type == "DequantizeLinear" and n.input[0] in q_out and n.input[0] not in names:
            names.append(n.input[0])
            m.graph.output.append(onnx.helper.make_tensor_value_info(n.output[0], onnx.TensorProto.FLOAT, None))
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x})[1:]


def test_rounded_pass_rounds_like_onnxruntime(models) -> None:
    """Layer by layer the simulated tensors equal ORT's. Deeper in, single-LSB flips from float
    summation order multiply (as they do between any two INT8 runtimes), so the check is on the first
    blocks, where a wrong range rule, a missing weight rounding or a misplaced quantizer would show."""
    _, sim, _, int8 = models
    x = images(8, 2)
    points = [m for m in sim.modules() if isinstance(m, ActQuant)]
    seen: list[np.ndarray] = []
    hooks = [m.register_forward_hook(lambda _m, _i, out: seen.append(out.detach().numpy())) for m in points]
    with torch.no_grad():
        sim(torch.from_numpy(x))
    for h in hooks:
        h.remove()
    ort_tensors = ort_rounded_tensors(int8, x)
    assert len(ort_tensors) == len(seen)
    for k, (mine, theirs, point) in enumerate(zip(seen[:4], ort_tensors[:4], points)):
        lsb = (float(point.hi) - float(point.lo)) / 255
        off = np.abs(mine - theirs) > lsb / 2
        assert off.mean() < 0.03, f"quantized tensor {k}: {off.mean():.1%} of values differ from ORT"


def test_float_pass_is_the_float_model(models) -> None:
    float_model, sim, _, _ = models
    x = torch.from_numpy(images(8, 3))
    with torch.no_grad(), float_pass(sim):
        np.testing.assert_allclose(sim(x).numpy(), float_model(x).numpy(), atol=1e-5)


def test_clipped_residual_ranges_reach_the_int8_model(models) -> None:
    """The percentile ranges QAT trains with are the ones ORT uses (a TensorQuantOverride), not ORT's
    own MinMax measurement."""
    import onnx
    from onnx import numpy_helper

    _, sim, _, int8 = models
    ranges = onnx_ranges(sim)
    assert len(ranges) == 16 + 9  # every project conv after the FP32 ones, every residual Add
    g = onnx.load(str(int8)).graph
    consts = {i.name: numpy_helper.to_array(i) for i in g.initializer}
    scale = {n.input[0]: float(consts[n.input[1]]) for n in g.node if n.op_type == "QuantizeLinear"}
    for name, (lo, hi) in ranges.items():
        assert scale[name] == pytest.approx((hi - lo) / 255, rel=1e-5)
    clipped = [m for m in sim.modules() if isinstance(m, ActQuant) and m.percentile is not None]
    assert len(clipped) == len(ranges)


def test_wrong_tensor_names_are_refused(models, tmp_path: Path) -> None:
    _, _, fp32, _ = models
    prep = preprocess_model(fp32, tmp_path / "p.onnx")
    with pytest.raises(RuntimeError, match="does not have"):
        quantize(prep, tmp_path / "q.onnx", images(16, 4), Candidate("MinMax", False), {"/no/such": [-1.0, 1.0]})
