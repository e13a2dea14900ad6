"""Fault 6: model problems. A clear start-up error, or the FP32 fallback where the manifest allows it, never
silent wrong results; a tampered model never runs, and no image is recorded or moved by a broken model.

Each case is a real bundle folder and a real `edge-agent scan` subprocess over
the same three good images; the table below is the expected behaviour.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from bundle_factory import make_bundle, tiny_classifier, write_manifest
from faults import agent_env, db_rows, distinct_images, inbox_files, outcome_rows, sha_file, write_images


def unloadable_onnx() -> bytes:
    """A well-formed ONNX file onnxruntime refuses to load (an operator set from the future)."""
    m = onnx.load_from_string(tiny_classifier(0))
    m.opset_import[0].version = 1000
    return m.SerializeToString()


def nan_model() -> bytes:
    """Runs fine and returns NaN logits (0/0): must never become a result."""
    zero = numpy_helper.from_array(np.zeros((1, 7), np.float32), "Z")
    w = numpy_helper.from_array(np.ones((6, 7), np.float32), "W")
    nodes = [helper.make_node("GlobalAveragePool", ["input"], ["avg"]),
             helper.make_node("GlobalMaxPool", ["input"], ["max"]),
             helper.make_node("Concat", ["avg", "max"], ["cat"], axis=1),
             helper.make_node("Flatten", ["cat"], ["feat"], axis=1),
             helper.make_node("MatMul", ["feat", "W"], ["lin"]),
             helper.make_node("Mul", ["lin", "Z"], ["zero"]),
             helper.make_node("Div", ["zero", "Z"], ["logits"])]
    g = helper.make_graph(nodes, "nan",
                          [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3, 32, 32])],
                          [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 7])],
                          initializer=[zero, w])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m.SerializeToString()


def _manifest(b: Path) -> dict:
    return json.loads((b / "manifest.json").read_text())


def missing(root: Path) -> Path:
    return root / "no-such-bundle"


def no_manifest(root: Path) -> Path:
    b = make_bundle(root / "b")
    (b / "manifest.json").unlink()
    return b


def garbage_int8_with_fallback(root: Path) -> Path:
    return make_bundle(root / "b", int8_bytes=b"\x08\x07 this is not a protobuf " * 40)


def unloadable_int8_with_fallback(root: Path) -> Path:
    return make_bundle(root / "b", int8_bytes=unloadable_onnx())


def unloadable_int8_no_fallback(root: Path) -> Path:
    return make_bundle(root / "b", int8_bytes=unloadable_onnx(), fallback=None)


def corrupt_fp32_primary_no_fallback(root: Path) -> Path:
    b = make_bundle(root / "b", primary="fp32", fallback=None)
    data = bytearray((b / "model.fp32.onnx").read_bytes())
    data[len(data) // 2:] = b"\xff" * (len(data) - len(data) // 2)  # damaged, then checksummed as shipped
    (b / "model.fp32.onnx").write_bytes(bytes(data))
    m = _manifest(b)
    m.pop("files")
    write_manifest(b, m, model_id=m["model_id"])
    return b


def tampered_after_build(root: Path) -> Path:
    b = make_bundle(root / "b")
    (b / "model.int8.onnx").write_bytes(tiny_classifier(seed=666))  # valid model, different weights
    return b


def tampered_fp32_only(root: Path) -> Path:
    b = make_bundle(root / "b")
    with open(b / "model.fp32.onnx", "ab") as f:
        f.write(b"\0")
    return b


def newer_format(root: Path) -> Path:
    b = make_bundle(root / "b")
    m = _manifest(b)
    m.pop("files")
    write_manifest(b, m, format_version=99, model_id=m["model_id"])
    return b


def wrong_number_of_outputs(root: Path) -> Path:
    five = tiny_classifier(0, n_classes=5)
    return _with_models(root / "b", five, five)


def nan_outputs(root: Path) -> Path:
    return _with_models(root / "b", nan_model(), nan_model())


def _with_models(b: Path, int8: bytes, fp32: bytes) -> Path:
    make_bundle(b)
    (b / "model.int8.onnx").write_bytes(int8)
    (b / "model.fp32.onnx").write_bytes(fp32)
    m = _manifest(b)
    m.pop("files")
    write_manifest(b, m)
    return b


# kind -> (bundle builder, expected exit code, words the error must contain, variant of the results or None)
CASES: dict[str, tuple[Callable[[Path], Path], int, tuple[str, ...], str | None]] = {
    "missing_bundle": (missing, 2, ("is not a folder",), None),
    "no_manifest": (no_manifest, 2, ("manifest.json is missing",), None),
    "checksum_mismatch_tampered": (tampered_after_build, 2, ("does not match its sha256", "do not run this one"),
                                   None),
    "fallback_file_tampered": (tampered_fp32_only, 2, ("model.fp32.onnx does not match its sha256",), None),
    "newer_format_version": (newer_format, 2, ("format_version 99 is newer than this agent understands",), None),
    "corrupt_int8_fp32_fallback": (garbage_int8_with_fallback, 0, (), "fp32"),
    "int8_fails_to_load_fp32_fallback": (unloadable_int8_with_fallback, 0, (), "fp32"),
    "int8_fails_to_load_no_fallback": (unloadable_int8_no_fallback, 3, ("cannot be loaded", "allows no fallback"),
                                       None),
    "corrupt_fp32_primary_no_fallback": (corrupt_fp32_primary_no_fallback, 3, ("cannot be loaded",), None),
    "outputs_do_not_match_labels": (wrong_number_of_outputs, 3, ("model output has shape",), None),
    "nan_outputs": (nan_outputs, 3, ("not finite",), None),
}


@pytest.mark.parametrize("kind", CASES)
def test_model_problem(kind: str, dirs, tmp_path) -> None:
    build, code, words, variant = CASES[kind]
    bundle = build(tmp_path / "bundles")
    shas = write_images(dirs["inbox"], distinct_images(3, seed=61))
    r = subprocess.run([sys.executable, "-m", "edge_agent", "scan", "--inbox", str(dirs["inbox"]), "--db",
                        str(dirs["db"]), "--model", str(bundle), "--workers", "1", "--threads", "1"],
                       env=agent_env(), capture_output=True, text=True, timeout=120)
    out = r.stdout + r.stderr
    print(f"{kind}: exit {r.returncode}: {out.strip().splitlines()[-1] if out.strip() else ''}")
    assert r.returncode == code, out
    assert "Traceback" not in out
    for w in words:
        assert w in out, out
    rows = outcome_rows(dirs["db"])
    if variant is None:  # refused: nothing recorded, nothing moved
        assert [r for r in rows if r["table"] == "results"] == [], "a broken model produced results"
        assert {p.name: sha_file(p) for p in inbox_files(dirs["inbox"])} == shas
        if code == 2:
            assert "refusing" in out or "not a folder" in out or "missing" in out
    else:  # fell back, and every result says so
        assert sorted(r["original_name"] for r in rows) == sorted(shas)
        assert {(r["model_variant"], r["fallback"]) for r in rows} == {(variant, 1)}
        assert db_rows(dirs["db"], "SELECT count(*) FROM events WHERE kind = 'fallback'")[0][0] == 1
        st = subprocess.run([sys.executable, "-m", "edge_agent", "status", "--db", str(dirs["db"])], env=agent_env(),
                            capture_output=True, text=True, timeout=60)
        assert st.returncode == 1 and "fallback model" in st.stderr
    shutil.rmtree(tmp_path / "bundles", ignore_errors=True)
