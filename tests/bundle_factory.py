"""Build small but real model bundles for the agent tests (docs/bundle-format.md).

The classifier is a genuine ONNX graph that onnxruntime executes:
input [batch,3,S,S] -> GlobalAveragePool and GlobalMaxPool -> concat ->
Gemm -> logits [batch,7], opset 17, dynamic batch, fixed random weights.
Its answers are meaningless medically but depend on the image, which is all
the plumbing tests need. `write_manifest` is reusable for any bundle folder.

Bundles are signed (manifest.sig) with a test key generated here, never the
project's: tests/conftest.py trusts its public key (TEST_PUBLIC_KEY) through
EDGE_AGENT_TRUSTED_KEYS and the settings it builds. A test about signatures
passes sign=False or its own key.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

LABELS = ["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"]
LABEL_NAMES = {"akiec": "Actinic keratosis / intraepithelial carcinoma", "bcc": "Basal cell carcinoma",
               "bkl": "Benign keratosis-like lesion", "df": "Dermatofibroma", "mel": "Melanoma",
               "nv": "Melanocytic nevus", "vasc": "Vascular lesion"}
HIGH_RISK = ["mel", "bcc", "akiec"]
SIZE = 32


def test_signing_key():
    """The tests' Ed25519 key: derived from a fixed seed, so every test process (and the agent subprocesses
    they start) agrees on it without sharing files. Trusted only where a test configures it."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    return Ed25519PrivateKey.from_private_bytes(hashlib.sha256(b"edge-derm-screen tests: not a real key").digest())


def _write_once(path: Path, data: bytes) -> Path:
    if not path.exists() or path.read_bytes() != data:
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        tmp.write_bytes(data)
        tmp.replace(path)
    return path


def _test_key_files() -> tuple[Path, Path]:
    from edge_agent.signing import private_pem, public_pem

    key = test_signing_key()
    pub = public_pem(key.public_key())
    stem = Path(tempfile.gettempdir()) / f"edge-derm-test-key-{hashlib.sha256(pub).hexdigest()[:12]}"
    return _write_once(stem.with_suffix(".key"), private_pem(key)), _write_once(stem.with_suffix(".pub"), pub)


TEST_PRIVATE_KEY, TEST_PUBLIC_KEY = _test_key_files()


def sign_bundle(bundle: Path, key=None) -> Path:
    """(Re-)sign `bundle`/manifest.json as it is now, with the test key unless `key` is given."""
    from edge_agent.signing import sign_bundle as sign

    sign(bundle, key or test_signing_key())
    return bundle


def tiny_classifier(seed: int = 0, size: int = SIZE, n_classes: int = len(LABELS), scale: float = 4.0) -> bytes:
    """Serialized ONNX model: pooled colour statistics -> linear layer -> logits."""
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((6, n_classes)) * scale).astype(np.float32)
    b = (rng.standard_normal(n_classes) * 0.5).astype(np.float32)
    nodes = [
        helper.make_node("GlobalAveragePool", ["input"], ["avg"]),
        helper.make_node("GlobalMaxPool", ["input"], ["max"]),
        helper.make_node("Concat", ["avg", "max"], ["cat"], axis=1),
        helper.make_node("Flatten", ["cat"], ["feat"], axis=1),
        helper.make_node("Gemm", ["feat", "W", "B"], ["logits"]),
    ]
    graph = helper.make_graph(
        nodes, "tiny_derm_classifier",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3, size, size])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", n_classes])],
        initializer=[numpy_helper.from_array(w, "W"), numpy_helper.from_array(b, "B")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="edge-agent-tests")
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def default_manifest(size: int = SIZE) -> dict[str, Any]:
    return {
        "format_version": 1,
        "model_id": "test-tiny-32-00000000-000000",  # suffix fixed up by write_manifest
        "created_at": "2026-11-21T00:00:00Z",
        "build_command": "tests/bundle_factory.py",
        "labels": list(LABELS),
        "label_names": dict(LABEL_NAMES),
        "high_risk_labels": list(HIGH_RISK),
        "preprocessing": {"input_size": size, "color_order": "RGB", "resize": "shorter_side_center_crop",
                          "interpolation": "area", "color_constancy": "shades_of_gray", "shades_of_gray_p": 6,
                          "mean": [127.0, 127.0, 127.0], "std": [128.0, 128.0, 128.0], "layout": "NCHW"},
        "input": {"name": "input", "shape": ["batch", 3, size, size], "dtype": "float32"},
        "output": {"name": "logits", "kind": "logits"},
        "models": {"int8": {"file": "model.int8.onnx", "approved": True},
                   "fp32": {"file": "model.fp32.onnx", "approved": True}},
        "primary": "int8",
        "fallback": "fp32",
        "temperature": 1.5,
        "thresholds": {"melanoma": {"labels": ["mel"], "probability": 0.3, "val_sensitivity": 0.9},
                       "malignant": {"labels": ["mel", "bcc", "akiec"], "probability": 0.5},
                       "low_confidence": {"top1_probability": 0.5}},
        "gate": {"approved": True, "reason": "int8 within 1% of fp32 on validation", "agreement": 0.99},
        "training": {"source": "synthetic test fixture"},
        "license": "CC BY-NC 4.0",
        "citation": "Tschandl et al. 2018, HAM10000",
    }


def write_manifest(bundle: Path, manifest: dict[str, Any] | None = None, *, sign: bool = True,
                   **overrides: Any) -> dict[str, Any]:
    """Write manifest.json with the sha256 of every other file in `bundle` (and a model_id ending in the
    primary's hash prefix, as build-model does), then sign it with the test key (sign=False: remove any
    manifest.sig, leaving the bundle unsigned). Returns the manifest."""
    m = dict(manifest or default_manifest())
    m.update(overrides)
    m["files"] = {p.name: sha256(p) for p in sorted(bundle.iterdir())
                  if p.is_file() and p.name not in ("manifest.json", "manifest.sig")}
    models, primary = m.get("models"), m.get("primary")  # tests also write deliberately broken manifests
    spec = models.get(primary) if isinstance(models, dict) and isinstance(primary, str) else None
    primary_file = spec.get("file") if isinstance(spec, dict) and isinstance(spec.get("file"), str) else None
    if primary_file in m["files"] and "model_id" not in overrides and isinstance(m.get("model_id"), str):
        m["model_id"] = m["model_id"].rsplit("-", 1)[0] + "-" + m["files"][primary_file][:8]
    (bundle / "manifest.json").write_text(json.dumps(m, indent=2))
    if sign:
        sign_bundle(bundle)
    else:
        (bundle / "manifest.sig").unlink(missing_ok=True)
    return m


def make_bundle(bundle: Path, *, seed: int = 0, int8_seed: int | None = None, int8_bytes: bytes | None = None,
                size: int = SIZE, sign: bool = True, **manifest_overrides: Any) -> Path:
    """A complete bundle folder: both variants, split.csv, report.md, checksummed manifest.

    int8_seed: give the INT8 variant different weights (to provoke spot-check disagreements).
    int8_bytes: replace the INT8 file with arbitrary bytes (e.g. a model that cannot load);
    it is still checksummed, so only the load fails, not verification.
    """
    bundle.mkdir(parents=True, exist_ok=True)
    fp32 = tiny_classifier(seed, size)
    (bundle / "model.fp32.onnx").write_bytes(fp32)
    if int8_bytes is None:
        int8_bytes = fp32 if int8_seed is None else tiny_classifier(int8_seed, size)
    (bundle / "model.int8.onnx").write_bytes(int8_bytes)
    (bundle / "split.csv").write_text("image_id,label,group,split\nISIC_0024332,bcc,HAM_0002240,test\n")
    (bundle / "report.md").write_text("# Test bundle\n\nSynthetic weights; for pipeline tests only.\n")
    m = default_manifest(size)
    m.update(manifest_overrides)
    write_manifest(bundle, m, sign=sign)
    return bundle


# --- format 3: a feature-map output, the classifier head, OOD statistics -------------------------------------

FEATURES = "features"


def conv_filters() -> np.ndarray:
    """8 fixed 3x3 filters over RGB: the three colour means, a vertical and a horizontal edge per image, and two
    Laplacians: enough for colour and texture to tell a skin photograph from noise or a printed page."""
    k = np.zeros((8, 3, 3, 3), np.float32)
    for c in range(3):
        k[c, c] = 1 / 9
    edge = np.array([[-1, 0, 1], [-2, 0, 2], [-1, 0, 1]], np.float32) / 8
    k[3, :] = edge / 3
    k[4, :] = edge.T / 3
    k[5, :] = -edge / 3
    lap = np.array([[0, 1, 0], [1, -4, 1], [0, 1, 0]], np.float32) / 4
    k[6, :] = lap / 3
    k[7, :] = -lap / 3
    return k


def conv_classifier(seed: int = 0, size: int = SIZE, n_classes: int = len(LABELS), features_output: bool = True,
                    scale: float = 4.0) -> tuple[bytes, np.ndarray, np.ndarray]:
    """ONNX model input -> Conv(8 fixed filters, stride 2) -> Relu -> [features] -> GlobalAveragePool -> Flatten
    -> Gemm -> logits; returns (bytes, head weight K x 8, head bias K) so tests know the true head."""
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((n_classes, 8)) * scale).astype(np.float32)
    b = (rng.standard_normal(n_classes) * 0.5).astype(np.float32)
    nodes = [
        helper.make_node("Conv", ["input", "K"], ["conv"], pads=[1, 1, 1, 1], strides=[2, 2]),
        helper.make_node("Relu", ["conv"], ["fmap"]),
        helper.make_node("GlobalAveragePool", ["fmap"], ["gap"]),
        helper.make_node("Flatten", ["gap"], ["feat"], axis=1),
        helper.make_node("Gemm", ["feat", "W", "B"], ["logits"], transB=1),
    ]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", n_classes])]
    if features_output:
        nodes.append(helper.make_node("Identity", ["fmap"], [FEATURES]))
        outputs.append(helper.make_tensor_value_info(FEATURES, TensorProto.FLOAT, ["batch", 8, None, None]))
    graph = helper.make_graph(
        nodes, "tiny_conv_classifier",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3, size, size])], outputs,
        initializer=[numpy_helper.from_array(conv_filters(), "K"), numpy_helper.from_array(w, "W"),
                     numpy_helper.from_array(b, "B")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="edge-agent-tests")
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString(), w, b


EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "images"


def reference_tensors(size: int = SIZE, n: int = 72, seed: int = 0) -> np.ndarray:
    """Preprocessed crops and flips of the committed dermoscopy examples: the fixture's 'training images'."""
    import cv2

    from edge_agent.preprocess import Preprocessing, preprocess

    pre = Preprocessing.from_dict(default_manifest(size)["preprocessing"])
    rng = np.random.default_rng(seed)
    ims = [cv2.cvtColor(cv2.imread(str(p)), cv2.COLOR_BGR2RGB) for p in sorted(EXAMPLES.glob("*.jpg"))]
    out = []
    for i in range(n):
        im = ims[i % len(ims)]
        h, w = im.shape[:2]
        s = rng.uniform(0.6, 1.0)
        ch, cw = int(h * s), int(w * s)
        y, x = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
        crop = im[y:y + ch, x:x + cw]
        if rng.random() < 0.5:
            crop = crop[:, ::-1]
        out.append(preprocess(np.ascontiguousarray(crop), pre))
    return np.stack(out).astype(np.float32)


def make_bundle_v3(bundle: Path, *, seed: int = 0, size: int = SIZE, sign: bool = True, quantile: float = 0.98,
                   **manifest_overrides: Any) -> Path:
    """A format-3 bundle: the conv classifier with its feature output, head.npz, and ood.npz fitted (with
    edge_agent.ood, the agent's own arithmetic) on reference_tensors(), threshold at `quantile` of their scores."""
    import onnxruntime as ort

    from edge_agent import ood

    bundle.mkdir(parents=True, exist_ok=True)
    model, w, b = conv_classifier(seed, size)
    for v in ("fp32", "int8"):
        (bundle / f"model.{v}.onnx").write_bytes(model)
    with open(bundle / "head.npz", "wb") as f:
        np.savez(f, weight=w, bias=b)
    sess = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    x = reference_tensors(size)
    logits, fmap = sess.run(["logits", FEATURES], {"input": x})
    pooled = fmap.mean(axis=(2, 3))
    whiten, means = ood.fit(pooled, logits.argmax(1), 0.05)
    t = float(np.quantile(ood.score(pooled, ood.stored(whiten).astype(np.float32), means), quantile))
    ood.save(bundle / "ood.npz", {"fp32": (whiten, means), "int8": (whiten, means)})
    (bundle / "split.csv").write_text("image_id,label,group,split\nISIC_0024332,bcc,HAM_0002240,test\n")
    (bundle / "report.md").write_text("# Test bundle (format 3)\n\nFixed filters; for pipeline tests only.\n")
    m = default_manifest(size)
    m.update(format_version=3, features={"output": FEATURES, "head": "head.npz"},
             ood={"file": "ood.npz", "method": ood.METHOD, "thresholds": {"fp32": t, "int8": t}, "quantile": quantile})
    m.update(manifest_overrides)
    write_manifest(bundle, m, sign=sign)
    return bundle
