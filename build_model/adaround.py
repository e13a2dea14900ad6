"""Adaptive rounding of the INT8 weights (AdaRound), one convolution at a time.

Why: ONNX Runtime rounds every weight to the nearest int8 step, and on the
default model that alone costs about one point of FP32/INT8 top-1 agreement,
the gate's tightest limit. Nearest is the best rounding for each weight on its
own, not for the layer's output: rounding some weights the other way can
cancel the error of the rest (Nagel et al., "Up or Down? Adaptive Rounding for
Post-Training Quantization", ICML 2020). Here each convolution, in graph
order, learns its up/down choices (and a per-channel bias shift, which ORT
keeps in int32 at a fine step) so that, fed the input the *quantized*
network actually produces upstream, it reproduces the *float* network's output
on calibration images. Later layers thereby also absorb the error that
rounded activations and weights upstream left behind.

The rounding happens in `qat.py`'s simulation, which rounds where and how
ORT's QDQ model does (tests/test_build_qat.py). The result is a float model
whose weights already sit on ORT's int8 grid: per channel the largest weight
keeps its value (so ORT recomputes the same scale) and every other weight is
an exact multiple of that scale, so `quantize_static` rounds nothing and the
INT8 model carries exactly the choices made here (tests/test_build_adaround.py
reads them back out of the ONNX file). The bundle's FP32 model stays the
original; the gate compares the INT8 model against it.
"""
from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
import torch.nn.functional as F

from .model import EfficientNetLite0
from .qat import ConvSite, calibrate, conv_sites, prepare

ZETA, GAMMA = 1.1, -0.1  # the rectified sigmoid's stretch (AdaRound's values)


@dataclass
class AdaRoundConfig:
    iters: int = 800              # optimisation steps per convolution
    positions: int = 32 * 24 * 24  # output pixels per step: whole images deep in the net, fewer early on
    max_batch: int = 32
    reg: float = 0.01             # weight of the push towards a hard 0/1 rounding choice
    warmup: float = 0.2           # fraction of steps before that push starts
    beta: tuple[float, float] = (20.0, 2.0)
    lr: float = 1e-3
    seed: int = 0


class _Stop(Exception):
    """Ends a forward pass once the tensor being collected has been seen."""


def _collect(model: nn.Module, module: nn.Module, what: str, x: torch.Tensor, batch: int = 32) -> torch.Tensor:
    got: list[torch.Tensor] = []

    def grab(_m: nn.Module, args: tuple, output: torch.Tensor | None = None) -> None:
        got.append((args[0] if what == "input" else output).detach().clone())
        raise _Stop

    hook = module.register_forward_pre_hook(grab) if what == "input" else module.register_forward_hook(grab)
    try:
        with torch.no_grad():
            for i in range(0, len(x), batch):
                try:
                    model(x[i:i + batch])
                except _Stop:
                    pass
    finally:
        hook.remove()
    return torch.cat(got)


def grid_scale(w: torch.Tensor) -> torch.Tensor:
    """ORT's per-channel symmetric int8 scale (max |w| / 127), shaped to broadcast over `w`."""
    return (w.abs().amax(dim=tuple(range(1, w.ndim)), keepdim=True) / 127.0).clamp_min(1e-12)


def _round_one(site: ConvSite, xq: torch.Tensor, target: torch.Tensor, cfg: AdaRoundConfig, seed: int) -> dict:
    """Learn this convolution's rounding; write the rounded weight and the bias shift into the model."""
    conv, bn, relu = site.conv, site.bn, site.relu
    pads = getattr(conv, "pads", (0, 0, 0, 0))
    w = conv.weight.detach().clone()
    s = grid_scale(w)
    ws = w / s
    floor, frac = torch.floor(ws), ws - torch.floor(ws)
    # The largest weight of each channel defines the scale ORT will recompute: it must not move.
    pinned = ws.abs() > 126.5
    v = nn.Parameter(-torch.log((ZETA - GAMMA) / (frac.clamp(1e-4, 1 - 1e-4) - GAMMA) - 1))  # h(v) == frac
    shift = nn.Parameter(torch.zeros_like(bn.bias))

    def h() -> torch.Tensor:
        return torch.clamp(torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA, 0, 1)

    def weight(hard: bool) -> torch.Tensor:
        up = (h() >= 0.5).float() if hard else h()
        return s * torch.clamp(floor + torch.where(pinned, torch.round(frac), up), -127, 127)

    def layer(x: torch.Tensor, wt: torch.Tensor) -> torch.Tensor:
        if any(pads):
            x = F.pad(x, pads)
        y = F.conv2d(x, wt, None, conv.stride, conv.padding, conv.dilation, conv.groups)
        y = F.batch_norm(y, bn.running_mean, bn.running_var, bn.weight, bn.bias + shift, False, 0.0, bn.eps)
        return F.relu6(y) if relu else y

    def error(wt: torch.Tensor) -> float:
        with torch.no_grad():
            errs = [(layer(xq[i:i + 16], wt) - target[i:i + 16]).pow(2).sum(1).mean() for i in range(0, len(xq), 16)]
        return float(torch.stack(errs).mean())

    nearest = error(s * torch.clamp(torch.round(ws), -127, 127))
    pixels = target.shape[2] * target.shape[3]
    batch = int(max(2, min(cfg.max_batch, cfg.positions // pixels, len(xq))))
    opt = torch.optim.Adam([v, shift], lr=cfg.lr)
    gen = torch.Generator().manual_seed(seed)
    warm = int(cfg.warmup * cfg.iters)
    for it in range(cfg.iters):
        idx = torch.randint(0, len(xq), (batch,), generator=gen)
        loss = (layer(xq[idx], weight(False)) - target[idx]).pow(2).sum(1).mean()
        if it >= warm:
            beta = cfg.beta[0] - (cfg.beta[0] - cfg.beta[1]) * (it - warm) / max(1, cfg.iters - warm)
            loss = loss + cfg.reg * (1 - (2 * h() - 1).abs().pow(beta)).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        final = weight(True)
        learned = error(final)
        flipped = float((torch.round(final / s) != torch.round(ws)).float().mean())
        conv.weight.copy_(final)
        bn.bias.add_(shift)
    return {"nearest_mse": nearest, "adaround_mse": learned, "flipped": flipped}


def adaround(model: EfficientNetLite0, fp32_first_convs: int, calib: torch.Tensor, images: torch.Tensor,
             cfg: AdaRoundConfig = AdaRoundConfig(), log: Callable[[str], None] = lambda s: None
             ) -> tuple[dict[str, torch.Tensor], list[dict]]:
    """Return a state dict for `model` with INT8-grid weights, and one row per convolution.

    `calib` are the images the quantize stage calibrates activation ranges on
    (the simulation must round with the same ranges); `images` are those the
    rounding is fitted on (calibration images plus more from the training split).
    `model` itself is left as it was.
    """
    torch.manual_seed(cfg.seed)
    ref = copy.deepcopy(model).eval()
    sim = copy.deepcopy(model)
    rounded = set(prepare(sim, fp32_first_convs))
    calibrate(sim, calib)
    rows = []
    t0 = time.time()
    for k, (site, ref_site) in enumerate(zip(conv_sites(sim), conv_sites(ref))):
        if site.name not in rounded:
            continue
        xq = _collect(sim, site.conv, "input", images)        # what the INT8 network feeds this layer
        target = _collect(ref, ref_site.bn, "output", images)  # what the float network computes
        if site.relu:
            target = F.relu6(target)
        row = {"conv": site.name, **_round_one(site, xq, target, cfg, cfg.seed * 1000 + k),
               "seconds": round(time.time() - t0, 1)}
        rows.append(row)
        log(f"adaround {site.name}: output MSE {row['nearest_mse']:.4g} -> {row['adaround_mse']:.4g} "
            f"({100 * row['flipped']:.1f}% of weights rounded the other way, {row['seconds']:.0f}s)")
        del xq, target
    # Non-persistent quantizer buffers aside, the state dict is the plain model's.
    return {k: v.detach().clone() for k, v in sim.state_dict().items()}, rows
