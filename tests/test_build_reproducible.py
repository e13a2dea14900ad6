"""The INT8 model must give the same answers on every CPU (build_model/reproducible.py).

What makes aarch64 and x86-64 agree is exactness: the FP32 front computes on integers that float32 holds
exactly (so no summation order or FMA can change a bit), and residual additions are not fused into
QLinearAdd. These tests check those properties on a real exported model and on the graph ONNX Runtime
actually runs (its optimised model), not on the ONNX file alone; the cross-CPU run itself is
scripts/aarch64-e2e.sh (docs/proofs/aarch64-e2e.txt).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper

from build_model.export import export_onnx, run_onnx, session
from build_model.model import build_model
from build_model.quantize import Candidate, input_bound, preprocess_model, quantize
from build_model.reproducible import EXACT, integer_front, not_reproducible
from tests.build_fixtures import model_inputs

SIZE = 64


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp("reproducible")
    torch.manual_seed(0)
    export_onnx(build_model(7, SIZE, pretrained=False).eval(), SIZE, tmp / "fp32.onnx")
    prep = preprocess_model(tmp / "fp32.onnx", tmp / "fp32.prep.onnx")
    calib = model_inputs(24, 1, SIZE)
    plain = quantize(prep, tmp / "plain.onnx", calib, Candidate("MinMax", False))
    exact = quantize(prep, tmp / "exact.onnx", calib, Candidate("MinMax", False, reproducible=True))
    assert Candidate("MinMax", False, reproducible=True).name == "minmax-rr0-x"
    return tmp, plain, exact, model_inputs(16, 2, SIZE)


def _inits(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}


def test_the_input_bound_is_what_preprocessing_can_give() -> None:
    assert input_bound((127.0,) * 3, (128.0,) * 3) == 1.0
    assert input_bound((123.675, 116.28, 103.53), (58.395, 57.12, 57.375)) == pytest.approx(151.47 / 57.375)


def test_answers_as_the_plain_int8_model_does(models) -> None:
    tmp, plain, exact, x = models
    a, b = run_onnx(session(plain), x), run_onnx(session(exact), x)
    ref = run_onnx(session(tmp / "fp32.onnx"), x)
    # the same model up to rounding noise: no further from FP32 than the plain INT8 model is, give or take
    assert np.abs(b - a).max() < 0.1 * np.abs(ref).max()
    assert np.abs(b - ref).mean() < 1.5 * np.abs(a - ref).mean() + 1e-3


def _grid_unit(w: np.ndarray) -> float | None:
    """The power of two that every weight is a whole multiple of (None: none up to 2**-60)."""
    for k in range(61):
        if np.array_equal(w * 2.0 ** k, np.round(w * 2.0 ** k)):
            return 2.0 ** -k
    return None


def test_front_weights_are_integers_and_no_partial_sum_can_round(models) -> None:
    _, _, exact, _ = models
    m = onnx.load(str(exact))
    inits = _inits(m)
    his = [n for n in m.graph.node if n.op_type == "Conv" and n.name.endswith("/integer")]
    los = [n for n in m.graph.node if n.op_type == "Conv" and n.name.endswith("/integer_lo")]
    assert len(his) == len(los) == 3  # the FP32 convolutions the quantizer keeps float (FP32_FIRST_CONVS)
    x_max = float(inits["reproducible/input/hi"])
    for hi, lo in zip(his, los):
        w, b = inits[hi.input[1]], inits[hi.input[2]]
        assert np.array_equal(w, np.round(w)) and np.array_equal(b, np.round(b)), hi.name
        worst = x_max * np.abs(w.astype(np.float64)).reshape(len(w), -1).sum(1) + np.abs(b)
        assert worst.max() < EXACT, hi.name
        for c, row in enumerate(inits[lo.input[1]]):  # the rounding left over, each channel on its own 2**-k grid
            unit = _grid_unit(row)
            assert unit is not None, f"{lo.name} channel {c}"
            assert x_max * np.abs(row.astype(np.float64) / unit).sum() < EXACT, f"{lo.name} channel {c}"
        x_max = 2047.0  # the 11-bit grid between front convolutions
    assert not_reproducible(m) == []


def test_every_summation_order_gives_the_same_float32_bits(models) -> None:
    """What exactness buys: the stem's sums in float32 forwards, backwards and in float64 agree bit for
    bit on the most extreme inputs the grid allows."""
    _, _, exact, _ = models
    m = onnx.load(str(exact))
    inits = _inits(m)
    stem = next(n for n in m.graph.node if n.op_type == "Conv" and n.name.endswith("/integer"))
    w = inits[stem.input[1]].reshape(len(inits[stem.input[1]]), -1)
    x_max = float(inits["reproducible/input/hi"])
    rng = np.random.default_rng(0)
    patches = np.concatenate([np.sign(w) * x_max, -np.sign(w) * x_max,
                              rng.integers(-x_max, x_max + 1, (64, w.shape[1]))]).astype(np.float32)
    for p in patches[:8]:
        for row in w:
            fwd = np.float32(0)
            for a, c in zip(p, row):
                fwd = np.float32(fwd + np.float32(a) * np.float32(c))
            bwd = np.float32(0)
            for a, c in zip(p[::-1], row[::-1]):
                bwd = np.float32(bwd + np.float32(a) * np.float32(c))
            exact64 = float(np.dot(p.astype(np.float64), row.astype(np.float64)))
            assert float(fwd) == float(bwd) == exact64
    f32 = patches @ w.T.astype(np.float32)
    assert np.array_equal(f32.astype(np.float64), patches.astype(np.float64) @ w.T.astype(np.float64))


@pytest.mark.parametrize("level", ["ORT_ENABLE_EXTENDED", "ORT_ENABLE_ALL"])  # spot-check, primary (infer.py)
def test_onnx_runtime_runs_the_exact_graph(models, level) -> None:
    """ORT's optimiser must neither fold the rescaling into the integer weights nor fuse the residual sums
    into QLinearAdd: read the graph it actually runs, at the levels the agent uses."""
    tmp, plain, exact, _ = models

    def optimised(path: Path) -> onnx.ModelProto:
        so = ort.SessionOptions()
        so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, level)
        so.optimized_model_filepath = str(tmp / f"{path.stem}.{level}.opt.onnx")
        ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        return onnx.load(so.optimized_model_filepath)

    ops_plain = [n.op_type for n in optimised(plain).graph.node]
    opt = optimised(exact)
    ops = [n.op_type for n in opt.graph.node]
    assert "QLinearAdd" in ops_plain  # the fusion that the Sum rewrite avoids does happen without it
    assert "QLinearAdd" not in ops and "Sum" in ops
    inits = _inits(opt)
    float_convs = [n for n in opt.graph.node if n.op_type in ("Conv", "FusedConv") and n.input[1] in inits
                   and inits[n.input[1]].dtype == np.float32]  # NCHWc convolutions are "Conv" in their domain
    on_grid = [n for n in float_convs if _grid_unit(inits[n.input[1]].reshape(len(inits[n.input[1]]), -1)[0]) is not None
               and all(_grid_unit(row) is not None for row in inits[n.input[1]])]
    front = [n for n in on_grid if inits[n.input[1]].shape[1:] != (1, 1, 1)]
    assert len(front) == 6, "the front's integer weights were rescaled"  # 3 convolutions, each a high and a low part
    for n in float_convs:
        if n not in front:  # x86's NCHWc pass runs a per-channel Mul as a 1x1 depthwise Conv: one multiply still
            w = inits[n.input[1]]
            group = next(a.i for a in n.attribute if a.name == "group")
            assert w.shape[1:] == (1, 1, 1) and group == w.shape[0], f"{n.name}: weights {w.shape} were rescaled"


def test_a_float_layer_left_by_a_gate_fallback_is_named(models) -> None:
    tmp, _, _, _ = models
    prep = tmp / "fp32.prep.onnx"
    convs = [n.name for n in onnx.load(str(prep)).graph.node if n.op_type == "Conv"]
    late = quantize(prep, tmp / "late.onnx", model_inputs(8, 3, SIZE),
                    Candidate("MinMax", False, exclude=(convs[6],), reproducible=True))
    why = not_reproducible(onnx.load(str(late)))
    assert why == [f"{convs[6]} computes in float before a quantizer"]


def test_the_plain_model_says_why_it_is_not_reproducible(models) -> None:
    _, plain, _, _ = models
    why = not_reproducible(onnx.load(str(plain)))
    assert any("computes in float before a quantizer" in w for w in why)
    assert any("would run as QLinearAdd" in w for w in why)


def test_a_front_it_does_not_know_is_refused_in_words(models) -> None:
    tmp, plain, _, _ = models
    m = onnx.load(str(plain))
    clip = next(n for n in m.graph.node if n.op_type == "Clip")
    lo = next(i for i in m.graph.initializer if i.name == clip.input[1])
    lo.CopyFrom(numpy_helper.from_array(np.array(-1.0, np.float32), lo.name))
    from build_model.reproducible import NotReproducible
    with pytest.raises(NotReproducible, match="only Clip"):
        integer_front(m, 1.0)
