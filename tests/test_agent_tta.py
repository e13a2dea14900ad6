"""Test-time augmentation: a bundle that asks for `tta: hflip` gets the mean of the two passes."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from bundle_factory import make_bundle
from edge_agent.bundle import load_bundle, verify_bundle
from edge_agent.infer import Engine


def left_half_classifier(size: int = 32, n_classes: int = 7) -> bytes:
    """Logits from the mean colour of the image's left half: a model that sees mirror images differently."""
    w = np.random.default_rng(1).standard_normal((3, n_classes)).astype(np.float32) * 4
    consts = [numpy_helper.from_array(np.array(v, np.int64), n) for n, v in
              (("starts", [0]), ("ends", [size // 2]), ("axes", [3]))]
    nodes = [helper.make_node("Slice", ["input", "starts", "ends", "axes"], ["left"]),
             helper.make_node("GlobalAveragePool", ["left"], ["avg"]),
             helper.make_node("Flatten", ["avg"], ["feat"], axis=1),
             helper.make_node("MatMul", ["feat", "W"], ["logits"])]
    graph = helper.make_graph(nodes, "left_half", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3, size, size])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", n_classes])],
                              initializer=[numpy_helper.from_array(w, "W"), *consts])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString()


def test_hflip_bundle_returns_the_mean_of_the_image_and_its_mirror(tmp_path: Path) -> None:
    left = left_half_classifier()
    plain = load_bundle(make_bundle(tmp_path / "plain", int8_bytes=left))
    tta = load_bundle(make_bundle(tmp_path / "tta", int8_bytes=left, tta="hflip", format_version=2))
    assert plain.tta == "none" and tta.tta == "hflip"
    x = np.random.default_rng(3).standard_normal((4, 3, 32, 32)).astype(np.float32)
    e_plain, e_tta = Engine(plain), Engine(tta)
    a, _ = e_plain.infer(x)
    b, _ = e_plain.infer(np.ascontiguousarray(x[..., ::-1]))
    got, _ = e_tta.infer(x)
    assert np.allclose(got, (a + b) / 2, atol=1e-5)
    assert not np.allclose(got, a, atol=1e-3)  # the mirror pass really changed something


def test_tta_needs_format_version_2_and_a_known_mode(tmp_path: Path) -> None:
    rep = verify_bundle(make_bundle(tmp_path / "v1", tta="hflip", format_version=1))
    assert not rep.ok and any("older agents would ignore it" in e for e in rep.errors)
    rep = verify_bundle(make_bundle(tmp_path / "odd", tta="rotate90", format_version=2))
    assert not rep.ok and any("'rotate90'" in e and "hflip" in e for e in rep.errors)
