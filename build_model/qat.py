"""Quantization-aware fine-tuning that mirrors what ONNX Runtime's INT8 will do.

Post-training INT8 of the default model fails the gate's 99% top-1
agreement: on the validation split, rounding only the weights costs 1.1
points, only the activations 0.9 (mostly the residual stream), and no
calibration method changes that much. QAT lets the weights adapt to the
rounding; for it to be worth anything the forward pass must round exactly
where and how `quantize.quantize` will (tests/test_build_qat.py compares
layer by layer with ORT):

* activations: uint8, asymmetric, per tensor, range = min/max over the same
  calibration images the quantize stage uses, with 0 inside the range
  (ORT's MinMax), re-measured at the start of every epoch and before each
  validation (the ranges saved with a checkpoint are those of its weights);
* weights: int8, symmetric [-127, 127], per output channel (ORT per_channel
  with WeightSymmetric). Symmetric per-channel rounding commutes with the
  per-channel scale that BatchNorm folding applies, so rounding the unfolded
  weight is the same as rounding the folded one;
* the first `FP32_FIRST_CONVS` convolutions and the classifier stay float,
  as they do in the INT8 model.

The model runs in eval mode throughout: BatchNorm statistics stay frozen (the
exported graph folds them) and dropout is off, so the only difference between
the rounded pass and the float pass is the rounding. The loss adds, to the
usual cross-entropy, a KL term pulling the rounded output towards the float
output of the same weights: the gate measures FP32/INT8 top-1 agreement, so
that is trained for directly. Gradients pass the rounding straight through
(PyTorch's fake-quantize ops). Nothing here adds parameters or persistent
buffers: the checkpoint loads into the plain model and exports exactly like
any other.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import nn
import torch.nn.functional as F

from .model import EfficientNetLite0


@dataclass
class QatState:
    weights: bool = True   # round weights (off while calibrating: ORT calibrates the float model)
    acts: bool = True      # round activations (off for the float reference pass)


@contextmanager
def float_pass(model: nn.Module) -> Iterator[None]:
    """Run `model` as the FP32 graph the INT8 one will be compared with."""
    state: QatState = model._qat
    saved = (state.weights, state.acts)
    state.weights = state.acts = False
    try:
        yield
    finally:
        state.weights, state.acts = saved


class ActQuant(nn.Module):
    """uint8 fake-quantizer with a range measured by `calibrate`.

    `percentile=None`: ORT's MinMax rule. A percentile clips the rare extreme
    values instead, for a finer step on everything else; the range is then
    handed to ORT as a TensorQuantOverride (see `onnx_ranges`), since ORT's
    own calibration would measure another one.
    """

    SAMPLES_PER_BATCH = 65536

    def __init__(self, state: QatState, percentile: float | None = None, seed: int = 0) -> None:
        super().__init__()
        self.state, self.percentile, self.seed = state, percentile, seed
        self.register_buffer("lo", torch.zeros(()), persistent=False)
        self.register_buffer("hi", torch.zeros(()), persistent=False)
        self.observing = False
        self.samples: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.observing:
            v = x.detach().reshape(-1)
            self.lo = torch.minimum(self.lo, v.min())
            self.hi = torch.maximum(self.hi, v.max())
            if self.percentile is not None:
                g = torch.Generator().manual_seed(self.seed * 1000 + len(self.samples))
                k = min(len(v), self.SAMPLES_PER_BATCH)
                self.samples.append(v[torch.randperm(len(v), generator=g)[:k]].float())
            return x
        lo, hi = float(self.lo), float(self.hi)
        if hi <= lo or not self.state.acts:
            return x
        scale = (hi - lo) / 255.0
        zero = min(255, max(0, round(-lo / scale)))
        return torch.fake_quantize_per_tensor_affine(x, scale, zero, 0, 255)


def quantize_weight(w: torch.Tensor) -> torch.Tensor:
    scale = (w.detach().abs().amax(dim=tuple(range(1, w.ndim))) / 127.0).clamp_min(1e-12)
    return torch.fake_quantize_per_channel_affine(w, scale, torch.zeros_like(scale, dtype=torch.int32), 0, -127, 127)


@dataclass(frozen=True)
class ConvSite:
    """One convolution in ONNX graph order, and what follows it."""
    conv: nn.Conv2d
    name: str
    owner: nn.Module      # holds the quant point on the convolution's (activated) output...
    attr: str             # ...under this attribute
    bn: nn.BatchNorm2d    # folded into the convolution on export
    relu: bool            # whether ReLU6 follows the BatchNorm


def conv_sites(model: EfficientNetLite0) -> list[ConvSite]:
    sites = [ConvSite(model._conv_stem, "_conv_stem", model, "q_stem", model._bn0, True)]
    for i, b in enumerate(model._blocks):
        if b.has_expand:
            sites.append(ConvSite(b._expand_conv, f"_blocks.{i}._expand_conv", b, "q_expand", b._bn0, True))
        sites.append(ConvSite(b._depthwise_conv, f"_blocks.{i}._depthwise_conv", b, "q_depthwise", b._bn1, True))
        sites.append(ConvSite(b._project_conv, f"_blocks.{i}._project_conv", b, "q_project", b._bn2, False))
    sites.append(ConvSite(model._conv_head, "_conv_head", model, "q_head", model._bn1, True))
    return sites


def prepare(model: EfficientNetLite0, fp32_first_convs: int, residual_percentile: float | None = None) -> list[str]:
    """Make `model` round like the INT8 graph; return the names of the rounded convolutions.

    `residual_percentile` clips the residual stream (project-conv and Add
    outputs) instead of using ORT's MinMax range: a finer step for most
    values at the cost of the rare large ones. On the default model it made
    agreement worse (README), so it is off unless asked for.
    """
    state = QatState()
    model._qat = state  # plain attribute: not a parameter, not in the state dict
    convs = conv_sites(model)
    rounded = [i >= fp32_first_convs for i in range(len(convs))]
    names = []
    for i, site in enumerate(convs):
        # ORT puts a Q/DQ pair on a tensor when its producer or its consumer is quantized.
        if rounded[i] or (i + 1 < len(convs) and rounded[i + 1]):
            setattr(site.owner, site.attr, ActQuant(state, residual_percentile if site.attr == "q_project" else None, i))
        if rounded[i]:
            names.append(site.name)
            _round_weights(site.conv, state)
    for i, b in enumerate(model._blocks):
        if b.skip:
            b.q_add = ActQuant(state, residual_percentile, 1000 + i)
    model.eval()
    return names


def _round_weights(conv: nn.Conv2d, state: QatState) -> None:
    pads = getattr(conv, "pads", (0, 0, 0, 0))

    def forward(x: torch.Tensor) -> torch.Tensor:
        if any(pads):
            x = F.pad(x, pads)
        w = quantize_weight(conv.weight) if state.weights else conv.weight
        return conv._conv_forward(x, w, conv.bias)

    conv.forward = forward


@torch.no_grad()
def calibrate(model: EfficientNetLite0, x: torch.Tensor, batch: int = 32) -> None:
    """Measure every activation range on `x` with the float model, as ORT's MinMax calibrator does."""
    points = [m for m in model.modules() if isinstance(m, ActQuant)]
    was_training = model.training
    model.eval()
    model._qat.weights = False
    for m in points:
        m.lo.zero_(); m.hi.zero_(); m.observing = True; m.samples = []
    try:
        for i in range(0, len(x), batch):
            model(x[i:i + batch])
    finally:
        for m in points:
            m.observing = False
        model._qat.weights = True
    for m in points:
        if m.percentile is not None and m.samples:
            v = torch.cat(m.samples)
            q = torch.quantile(v, torch.tensor([(100 - m.percentile) / 100, m.percentile / 100]))
            m.lo.fill_(min(float(q[0]), 0.0)); m.hi.fill_(max(float(q[1]), 0.0))
        m.samples = []
    model.train(was_training)


def onnx_ranges(model: EfficientNetLite0) -> dict[str, list[float]]:
    """Clipped (percentile) ranges by the name the exported graph gives the tensor, for ORT's
    TensorQuantOverrides. The quantize stage refuses names the graph does not have."""
    out = {}
    for i, b in enumerate(model._blocks):
        for attr, tensor in (("q_project", "_project_conv/Conv_output_0"), ("q_add", "Add_output_0")):
            m = getattr(b, attr)
            if isinstance(m, ActQuant) and m.percentile is not None:
                out[f"/_blocks.{i}/{tensor}"] = [float(m.lo), float(m.hi)]
    return out
