"""Static INT8 quantization with ONNX Runtime (QDQ, per-channel weights).

Follows the ONNX Runtime recipe: `quant_pre_process` (shape inference and
graph optimisation) first, then `quantize_static` with a calibration set drawn
from the training split and stratified by class (never val/test: the gate
must judge on data calibration never saw). The calibration method and
reduce_range are not guessed: every candidate is built and the one with the
best validation-split agreement/balanced accuracy is kept.

reduce_range (7-bit weights) exists for x86 CPUs without VNNI, where U8S8
multiply-adds can saturate in 16 bits; whether it helps is measured per model.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .export import INPUT
from .reproducible import make_reproducible

METHODS = ("MinMax", "Entropy", "Percentile")
FP32_FIRST_CONVS = 3
CALIB_SIZE = 256  # calibration images (QAT measures its ranges on the same ones)
ADAROUND_ITERS = 800    # per convolution; about 18 min for the 192 px model on 2 cores
ADAROUND_IMAGES = 384   # AdaRound fits on the calibration images plus more from the training split


class ArrayReader:
    """CalibrationDataReader over a preprocessed float32 array, in small batches."""

    def __init__(self, x: np.ndarray, batch: int = 16) -> None:
        # ORT's histogram calibrators stack per-batch arrays: every batch must have the same size.
        batch = min(batch, len(x))
        self.x, self.batch, self.i = x[:len(x) // batch * batch], batch, 0

    def get_next(self):
        if self.i >= len(self.x):
            return None
        out = {INPUT: self.x[self.i:self.i + self.batch]}
        self.i += self.batch
        return out

    def rewind(self) -> None:
        self.i = 0

    def __iter__(self):  # qdq_loss_debug.collect_activations iterates instead of calling get_next
        self.rewind()
        while (item := self.get_next()) is not None:
            yield item


def calibration_indices(y: np.ndarray, split: np.ndarray, n: int, seed: int) -> np.ndarray:
    """`n` training-split images, stratified by class (at least 4 per class where available)."""
    rng = np.random.default_rng(seed)
    train = np.flatnonzero(split == "train")
    classes = np.unique(y[train])
    per = max(4, n // len(classes))
    picks = []
    for k in classes:
        members = train[y[train] == k]
        picks.append(rng.choice(members, size=min(per, len(members)), replace=False))
    out = np.concatenate(picks)
    rng.shuffle(out)
    return out


def preprocess_model(fp32: Path, out: Path) -> Path:
    from onnxruntime.quantization.shape_inference import quant_pre_process

    quant_pre_process(str(fp32), str(out), skip_symbolic_shape=False)
    return out


@dataclass
class Candidate:
    method: str
    reduce_range: bool
    exclude: tuple[str, ...] = ()
    adaround: bool = False  # quantizes the AdaRound model (build_model/adaround.py), not the exported one
    reproducible: bool = False  # exact arithmetic: the same answers on every CPU (build_model/reproducible.py)

    @property
    def name(self) -> str:
        tag = f"{self.method.lower()}-rr{int(self.reduce_range)}" + ("-ada" if self.adaround else "") + \
            ("-x" if self.reproducible else "")
        return tag + (f"-fp32x{len(self.exclude)}" if self.exclude else "")

    def source(self, work: Path) -> Path:
        """The pre-processed float model this candidate quantizes."""
        return work / ("model.adaround.prep.onnx" if self.adaround else "model.fp32.prep.onnx")


def input_bound(mean: tuple[float, ...], std: tuple[float, ...]) -> float:
    """The largest |value| the preprocessing can feed the model: pixels are clipped to [0, 255] first."""
    return max(max(abs(0.0 - m), abs(255.0 - m)) / s for m, s in zip(mean, std))


def quantize(prep: Path, out: Path, calib: np.ndarray, cand: Candidate,
             ranges: dict[str, list[float]] | None = None, bound: float = 1.0) -> Path:
    """`ranges`: tensor -> [rmin, rmax] that quantization-aware training clipped to and trained with;
    they override what calibration measures for those tensors. `bound`: input_bound() of the
    preprocessing (the default, 1.0, is (x - 127) / 128).

    A `reproducible` candidate is then rewritten to exact arithmetic (build_model/reproducible.py): the
    gate judges, and the device runs, a model that gives the same answers on x86-64 and aarch64."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    import onnx

    # The classifier head (one 1280x7 Gemm) stays FP32: it costs nothing in speed,
    # and quantizing the logits themselves would put a 1/255-of-range step
    # straight onto the decision the gate measures.
    nodes = onnx.load(str(prep)).graph.node
    head = [n.name for n in nodes if n.op_type == "Gemm"]
    # The first convolutions too: measured on the default model, quantizing the
    # image input and the 80x80 stem/first block caused most FP32/INT8
    # disagreement (val agreement 97.4% -> 98.7% with these 3 convs in FP32), for
    # about 6% of the network's multiply-adds.
    head += [n.name for n in nodes if n.op_type == "Conv"][:FP32_FIRST_CONVS]
    extra = {"ActivationSymmetric": False, "WeightSymmetric": True}
    if cand.method == "Percentile":
        extra["CalibPercentile"] = 99.999
    if ranges:
        graph_tensors = {o for n in nodes for o in n.output}
        missing = sorted(set(ranges) - graph_tensors)
        if missing:
            raise RuntimeError(f"QAT ranges name tensors the ONNX graph does not have ({missing[:3]}...): "
                               "build_model/qat.py onnx_ranges and the exporter disagree on names")
        extra["TensorQuantOverrides"] = {k: [{"rmin": np.float32(lo), "rmax": np.float32(hi)}]
                                         for k, (lo, hi) in ranges.items()}
    quantize_static(str(prep), str(out), ArrayReader(calib), quant_format=QuantFormat.QDQ,
                    per_channel=True, reduce_range=cand.reduce_range,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    calibrate_method=getattr(CalibrationMethod, cand.method),
                    nodes_to_exclude=sorted(set(cand.exclude) | set(head)), extra_options=extra)
    if cand.reproducible:
        make_reproducible(str(out), str(out), bound, calib)
    return out


def sensitive_nodes(fp32_prep: Path, int8: Path, x: np.ndarray, workdir: Path) -> list[list[str]]:
    """Groups of nodes to keep in FP32, most harmful quantized tensor first.

    ORT's qdq_loss_debug runs the quantized model with every intermediate tensor
    exposed and measures each tensor's own quantization noise (SQNR of the
    tensor before vs after its Q/DQ pair). A tensor stays float only if every
    node that reads it is excluded, so each group is the consumers of one noisy
    tensor (plus the activation that produced it) - the layer-wise revert that
    NNCF's accuracy-control loop does.
    """
    import onnx
    from onnxruntime.quantization.qdq_loss_debug import (
        collect_activations, compute_activation_error, create_activation_matching,
        modify_model_output_intermediate_tensors)

    a_fp, a_q = workdir / "debug.fp32.onnx", workdir / "debug.int8.onnx"
    modify_model_output_intermediate_tensors(str(fp32_prep), str(a_fp))
    modify_model_output_intermediate_tensors(str(int8), str(a_q))
    fp = collect_activations(str(a_fp), ArrayReader(x))
    q = collect_activations(str(a_q), ArrayReader(x))
    errs = compute_activation_error(create_activation_matching(q, fp))
    graph = onnx.load(str(fp32_prep)).graph
    producer = {o: n for n in graph.node for o in n.output}
    consumers: dict[str, list[str]] = {}
    for n in graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n.name)
    ranked = sorted((v.get("qdq_err", float("inf")), k) for k, v in errs.items() if k in producer)
    for p in (a_fp, a_q):
        p.unlink(missing_ok=True)
    groups = []
    for _, tensor in ranked:
        group = list(consumers.get(tensor, []))
        if producer[tensor].op_type in ("Clip", "Relu"):
            group.append(producer[tensor].name)
        if group:
            groups.append(group)
    return groups
