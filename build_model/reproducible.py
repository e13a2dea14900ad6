"""Make the INT8 model give the same answers on every CPU (x86-64 with or without VNNI, aarch64).

Measured with onnxruntime 1.32 (scripts/int8_layers.py, docs/aarch64.md): every integer layer of the
INT8 model (QLinearConv, depthwise included) is bit-identical on aarch64 and x86-64, yet the model's
probabilities differed by up to 1.3e-2. Two places put platform-dependent float rounding in front of a
quantizer, and one flipped 8-bit step then spreads through the network:

1. The first convolutions stay FP32 (quantizing them costs 2 points of INT8/FP32 agreement, more than
   the gate allows). Their float sums come out a last bit apart on another CPU (other summation order,
   FMA), and the QuantizeLinear after them rounds those to different integers now and then.
2. QLinearAdd (the residual additions) requantizes in float with per-ISA code: about 1 value in 50,000
   differs.

The remedies keep the arithmetic the gate approves, and make it exact:

1. *An integer front.* Each leading FP32 convolution runs on integer-valued float tensors: its input is
   rounded to a fine grid (the image to 1/16 of a pixel level, the activations between front
   convolutions to 11 bits), its weights to integers per output channel, split in two convolutions (the
   integers, and the rounding left over on a finer power-of-two grid: about 17-bit weights together),
   each with as many bits as keep every partial sum below 2**24. Every product and partial sum is then
   a number float32 holds exactly, whatever the summation order or the use of FMA, so each convolution
   gives the same bits on every CPU; what follows (the two parts' sum, the rescaling) are single IEEE
   operations, the same everywhere too. The front stays about as close to FP32 as the float front was
   (measured on the default model: 9-10-bit weights alone moved 16% of the first quantizer's outputs by
   a step, the split 9%, and lost 0.3 points of INT8/FP32 agreement that the split recovers).
2. *Residual additions as Sum.* ONNX `Sum` of two dequantized tensors is not fused into QLinearAdd:
   it runs as DequantizeLinear (exact) + one float addition (correctly rounded) + QuantizeLinear
   (one division and round-half-even, the same on both ISAs: measured over 5 million values).

The graph stays plain ONNX (Conv, Clip, Add, Mul, Round, Sum), so the agent runs it unchanged.
ONNX Runtime's optimiser folds a Mul that directly follows a Conv into the Conv's weights, and x86's
NCHWc pass accumulates one convolution onto another's output; either would round partial sums. A wide
Clip after each integer convolution (exact: no value comes near its bounds) prevents both.
Cost: the front's convolutions run twice and a few element-wise passes are added (docs/aarch64.md).
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

EXACT = 2 ** 24          # float32 holds every integer up to this exactly
BUDGET = 2 ** 23         # what the weights may use: half of it, for the rounding of each weight
ACT_LEVELS = 2047        # 11-bit grid for the ReLU6 activations between the front convolutions
SIGNED_LEVELS = 4095     # 13-bit signed grid for the others (a project convolution's output)
INPUT_STEP = 2.0 ** -11  # the image's grid, 1/16 of a pixel level (a power of two: the scaling is exact)


class NotReproducible(RuntimeError):
    """The model's front is not the shape this transform knows (say which node, so the build can stop)."""


def _consumers(graph: onnx.GraphProto) -> dict[str, list[onnx.NodeProto]]:
    out: dict[str, list[onnx.NodeProto]] = {}
    for n in graph.node:
        for i in n.input:
            out.setdefault(i, []).append(n)
    return out


def _const(graph: onnx.GraphProto, inits: dict[str, onnx.TensorProto], name: str, value: np.ndarray) -> str:
    t = numpy_helper.from_array(np.asarray(value, dtype=np.float32), name)
    graph.initializer.append(t)
    inits[name] = t
    return name


def _front(graph: onnx.GraphProto) -> list[tuple[onnx.NodeProto, onnx.NodeProto | None]]:
    """The FP32 convolutions from the image input up to the first quantizer: [(Conv, Clip or None)]."""
    inits = {i.name for i in graph.initializer}
    cons = _consumers(graph)
    x = graph.input[0].name
    chain: list[tuple[onnx.NodeProto, onnx.NodeProto | None]] = []
    while True:
        users = cons.get(x, [])
        convs = [n for n in users if n.op_type == "Conv"]
        if len(convs) != 1 or len(users) != 1 or convs[0].input[1] not in inits:
            break
        conv = convs[0]
        nxt = cons.get(conv.output[0], [])
        clip = nxt[0] if len(nxt) == 1 and nxt[0].op_type == "Clip" else None
        chain.append((conv, clip))
        x = (clip or conv).output[0]
    if chain:
        last = (chain[-1][1] or chain[-1][0]).output[0]
        if [n.op_type for n in cons.get(last, [])] != ["QuantizeLinear"]:
            raise NotReproducible(f"the FP32 front ends in {last!r}, which does not feed one QuantizeLinear")
    return chain


def _clip_bounds(clip: onnx.NodeProto, inits: dict[str, onnx.TensorProto]) -> tuple[float, float]:
    lo = float(numpy_helper.to_array(inits[clip.input[1]])) if len(clip.input) > 1 and clip.input[1] else -np.inf
    hi = float(numpy_helper.to_array(inits[clip.input[2]])) if len(clip.input) > 2 and clip.input[2] else np.inf
    return lo, hi


def integer_front(model: onnx.ModelProto, input_bound: float,
                  ranges: dict[str, np.ndarray] | None = None) -> int:
    """Rewrite the leading FP32 convolutions as exact integer arithmetic in float32 (in place).

    `input_bound`: the largest |value| the preprocessing can give (1.0 for (x - 127) / 128).
    `ranges`: per-channel max |value| of the output of each front convolution that has no ReLU6 and
    feeds another front convolution (measured on the calibration images: front_ranges()); its grid
    is that range plus a quarter, clipped beyond. Returns how many convolutions were rewritten."""
    g = model.graph
    inits = {i.name: i for i in g.initializer}
    chain = _front(g)
    if not chain:
        return 0
    new_nodes: list[onnx.NodeProto] = []
    replaced = {id(c) for c, _ in chain} | {id(k) for _, k in chain if k is not None}
    x_name = g.input[0].name
    # the image onto its grid: x_int = clip(round(x / step)), |x_int| <= bound / step
    x_max = float(np.ceil(input_bound / INPUT_STEP))
    pre = "reproducible/input"
    new_nodes += [
        helper.make_node("Mul", [x_name, _const(g, inits, f"{pre}/inv_step", np.float32(1 / INPUT_STEP))], [f"{pre}/scaled"]),
        helper.make_node("Round", [f"{pre}/scaled"], [f"{pre}/rounded"]),
        helper.make_node("Clip", [f"{pre}/rounded", _const(g, inits, f"{pre}/lo", np.float32(-x_max)),
                                  _const(g, inits, f"{pre}/hi", np.float32(x_max))], [f"{pre}/int"]),
    ]
    channels = numpy_helper.to_array(inits[chain[0][0].input[1]]).shape[1]
    cur, cur_max, cur_step = f"{pre}/int", x_max, np.full(channels, INPUT_STEP)
    for i, (conv, clip) in enumerate(chain):
        p = f"reproducible/conv{i}"
        w = numpy_helper.to_array(inits[conv.input[1]]).astype(np.float64)
        b = numpy_helper.to_array(inits[conv.input[2]]).astype(np.float64) if len(conv.input) > 2 and conv.input[2] \
            else np.zeros(w.shape[0])
        group = next((a.i for a in conv.attribute if a.name == "group"), 1)
        # fold the per-channel input step into the weights: y = sum(w * step[c] * x_int) + b
        if group == 1:
            w = w * cur_step[None, :, None, None]
        elif group == w.shape[0] and w.shape[1] == 1 and len(cur_step) == group:
            w = w * cur_step[:, None, None, None]
        else:
            raise NotReproducible(f"{conv.name}: grouped convolution with group={group} is not supported in the front")
        l1 = np.abs(w).reshape(w.shape[0], -1).sum(1)
        sw = (cur_max * l1 + np.abs(b)) / BUDGET
        sw = np.where(sw > 0, sw, 1.0)
        w_int = np.round(w / sw[:, None, None, None])
        b_int = np.round(b / sw)
        worst = cur_max * np.abs(w_int).reshape(w.shape[0], -1).sum(1) + np.abs(b_int)
        # The rounding left over, as a second integer convolution at 2**-k of the first's unit (per output
        # channel, as many bits as its own partial sums allow): together about 17-bit weights, which keeps
        # the front as close to FP32 as the float front was (measured: 9-10-bit weights alone cost 0.3
        # points of INT8/FP32 agreement on the default model).
        rest = w / sw[:, None, None, None] - w_int
        rest_l1 = np.maximum(np.abs(rest).reshape(w.shape[0], -1).sum(1), 1e-12)
        k = np.clip(np.floor(np.log2(BUDGET / (cur_max * rest_l1 * 2.0))), 0, 24)
        w_lo = np.round(rest * (2.0 ** k)[:, None, None, None])
        worst_lo = cur_max * np.abs(w_lo).reshape(w.shape[0], -1).sum(1)
        if worst.max() >= EXACT or worst_lo.max() >= EXACT:
            raise NotReproducible(f"{conv.name}: a partial sum could reach {max(worst.max(), worst_lo.max()):.0f} >= 2**24")
        scale = sw  # real value of one unit of the integer output, per output channel
        shape = (1, -1, 1, 1)
        hi_conv = helper.make_node("Conv", [cur, _const(g, inits, f"{p}/w_int", w_int), _const(g, inits, f"{p}/b_int", b_int)],
                                   [f"{p}/hi"], name=f"{conv.name}/integer")
        # its weights carry the 2**-k (a power of two: products and partial sums stay exact)
        lo_conv = helper.make_node("Conv", [cur, _const(g, inits, f"{p}/w_lo", w_lo * (2.0 ** -k)[:, None, None, None])],
                                   [f"{p}/lo"], name=f"{conv.name}/integer_lo")
        hi_conv.attribute.extend(conv.attribute)
        lo_conv.attribute.extend(conv.attribute)
        # Wide Clips change nothing (every value is below 2**24); as fused activations they keep ONNX Runtime
        # from folding the Mul into the Conv or accumulating one convolution onto the other (x86 NCHWc "Sum"),
        # either of which would round partial sums.
        wide = [_const(g, inits, f"{p}/wide_lo", np.float32(-EXACT)), _const(g, inits, f"{p}/wide_hi", np.float32(EXACT))]
        new_nodes += [
            hi_conv, helper.make_node("Clip", [f"{p}/hi", *wide], [f"{p}/hi_kept"]),
            lo_conv, helper.make_node("Clip", [f"{p}/lo", *wide], [f"{p}/lo_kept"]),
            helper.make_node("Add", [f"{p}/hi_kept", f"{p}/lo_kept"], [f"{p}/acc"]),  # one rounding, IEEE
        ]
        last = i == len(chain) - 1
        if clip is not None:
            lo, hi = _clip_bounds(clip, inits)
            if lo != 0.0 or not np.isfinite(hi):
                raise NotReproducible(f"{clip.name}: only Clip(0, max) (ReLU6) is supported in the front, got ({lo}, {hi})")
            src = f"{p}/acc"  # ReLU6's lower bound: the Clip after the (positive) rescaling below
        else:
            src, hi = f"{p}/acc", None
        out_name = (clip or conv).output[0]
        if last:
            # back to real units for the quantizer that follows (one IEEE multiply), clipped as before
            mul_out = f"{p}/real" if clip is not None else out_name
            new_nodes.append(helper.make_node("Mul", [src, _const(g, inits, f"{p}/scale", scale.reshape(shape))], [mul_out]))
            if clip is not None:
                new_nodes.append(helper.make_node("Clip", [mul_out, _const(g, inits, f"{p}/zero", np.float32(0)),
                                                           _const(g, inits, f"{p}/max", np.float32(hi))], [out_name]))
            continue
        q = f"{p}/next"
        if clip is not None:  # ReLU6: [0, max] on an 11-bit grid
            nxt_step, lo_int, hi_int = np.full(w.shape[0], hi / ACT_LEVELS), 0.0, float(ACT_LEVELS)
        else:  # signed, per channel, from the calibration range (with a quarter to spare)
            if not ranges or conv.output[0] not in ranges:
                raise NotReproducible(f"{conv.name}: its output feeds another FP32 convolution and no calibration "
                                      "range was given for it (front_ranges)")
            amax = np.maximum(np.asarray(ranges[conv.output[0]], np.float64) * 1.25, 1e-6)
            nxt_step, lo_int, hi_int = amax / SIGNED_LEVELS, -float(SIGNED_LEVELS), float(SIGNED_LEVELS)
        new_nodes += [
            helper.make_node("Mul", [src, _const(g, inits, f"{q}/ratio", (scale / nxt_step).reshape(shape))], [f"{q}/scaled"]),
            helper.make_node("Clip", [f"{q}/scaled", _const(g, inits, f"{q}/lo", np.float32(lo_int)),
                                      _const(g, inits, f"{q}/hi", np.float32(hi_int))], [f"{q}/clipped"]),
            helper.make_node("Round", [f"{q}/clipped"], [f"{q}/int"]),
        ]
        cur, cur_max, cur_step = f"{q}/int", max(abs(lo_int), hi_int), nxt_step
    kept = [n for n in g.node if id(n) not in replaced]
    del g.node[:]
    g.node.extend(new_nodes + kept)
    for name in {c.input[1] for c, _ in chain} | {c.input[2] for c, _ in chain if len(c.input) > 2}:
        if not any(name in n.input for n in g.node):
            g.initializer.remove(inits[name])
    return len(chain)


def front_ranges(model_path: str, calib: np.ndarray) -> dict[str, np.ndarray]:
    """Per-channel max |value| of each front convolution output that has no ReLU6 after it (the signed
    activations between front convolutions), on the calibration images, with ONNX Runtime."""
    import onnxruntime as ort

    m = onnx.load(model_path)
    chain = _front(m.graph)
    names = [c.output[0] for c, k in chain[:-1] if k is None]
    if not names:
        return {}
    for n in names:
        m.graph.output.append(helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None))
    so = ort.SessionOptions()
    so.log_severity_level = 3
    s = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
    out = {n: np.zeros(0) for n in names}
    for i in range(0, len(calib), 16):
        vals = s.run(names, {m.graph.input[0].name: calib[i:i + 16]})
        for n, v in zip(names, vals):
            a = np.abs(v).max(axis=(0, 2, 3))
            out[n] = a if not len(out[n]) else np.maximum(out[n], a)
    return out


def _fused_add(n: onnx.NodeProto, producer: dict[str, onnx.NodeProto]) -> bool:
    """An Add of two dequantized tensors: ONNX Runtime runs it as QLinearAdd."""
    return n.op_type == "Add" and len(n.input) == 2 and all(
        producer.get(i) is not None and producer[i].op_type == "DequantizeLinear" for i in n.input)


def residual_sums(model: onnx.ModelProto) -> int:
    """Turn each Add of two dequantized tensors into Sum, which ONNX Runtime does not fuse into QLinearAdd."""
    producer = {o: n for n in model.graph.node for o in n.output}
    adds = [n for n in model.graph.node if _fused_add(n, producer)]
    for n in adds:
        n.op_type = "Sum"
    return len(adds)


def not_reproducible(model: onnx.ModelProto) -> list[str]:
    """Why this QDQ model may still answer differently on another CPU ([] when nothing is left).

    What remains float is exact or harmless: the integer front, Sum of dequantized tensors, and the
    head after the last quantizer (ReduceMean, Gemm: their last-bit differences reach no quantizer)."""
    g = model.graph
    inits = {i.name for i in g.initializer}
    producer = {o: n for n in g.node for o in n.output}
    cons = _consumers(g)
    why = []
    for n in g.node:
        if n.op_type in ("Conv", "MatMul", "Gemm") and n.input[1] in inits and not n.name.endswith(("/integer", "/integer_lo")):
            # a float layer is harmless only if no quantizer lies downstream of it
            if _feeds_quantizer(cons, n):
                why.append(f"{n.name} computes in float before a quantizer")
        if _fused_add(n, producer):
            why.append(f"{n.name} would run as QLinearAdd")
    return why


def _feeds_quantizer(cons: dict[str, list[onnx.NodeProto]], node: onnx.NodeProto) -> bool:
    todo, seen = list(node.output), set()
    while todo:
        t = todo.pop()
        for c in cons.get(t, []):
            if c.op_type == "QuantizeLinear":
                return True
            if id(c) not in seen:
                seen.add(id(c))
                todo.extend(c.output)
    return False


def make_reproducible(src: str, dst: str, input_bound: float, calib: np.ndarray | None = None) -> dict:
    """Both rewrites on a QDQ model file; returns what was changed and what, if anything, still is not
    exact (a gate fallback that keeps a later layer in FP32 leaves float sums before a quantizer). A
    front this module does not know stays as it was (and is reported), it does not stop the build.
    `calib`: the calibration images, for the ranges of signed activations inside a longer front."""
    model = onnx.load(src)
    try:
        front = integer_front(model, input_bound, front_ranges(src, calib) if calib is not None else None)
    except NotReproducible as e:
        model = onnx.load(src)
        front, refused = 0, [f"front left in float: {e}"]
    else:
        refused = []
    sums = residual_sums(model)
    onnx.checker.check_model(model)
    onnx.save(model, dst)
    left = refused + not_reproducible(model)
    return {"integer_front_convs": front, "residual_sums": sums, "reproducible": not left, "not_reproducible": left}
