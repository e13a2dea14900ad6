"""`build-model evaluate`: a bundle through the agent's own code, per source, with known answers.

The bundle's model reads colour only (red -> melanoma, green -> nevus, blue -> keratosis), so
a source whose melanomas are red is perfectly separated and one whose melanomas are green is
perfectly wrong: every number is known in advance.
"""
from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from bundle_factory import LABELS, default_manifest, make_bundle, write_manifest
from build_model.evaluate import evaluate_bundle

COLOURS = {"red": (240, 30, 30), "green": (30, 240, 30), "blue": (30, 30, 240)}  # RGB


def colour_model(size: int = 32) -> bytes:
    w = np.zeros((3, len(LABELS)), np.float32)
    b = np.full(len(LABELS), -10.0, np.float32)
    for lab, ch in (("mel", 0), ("nv", 1), ("bkl", 2)):
        w[ch, LABELS.index(lab)] = 5.0
        b[LABELS.index(lab)] = 0.0
    nodes = [helper.make_node("GlobalAveragePool", ["input"], ["avg"]),
             helper.make_node("Flatten", ["avg"], ["feat"], axis=1),
             helper.make_node("Gemm", ["feat", "W", "B"], ["logits"])]
    graph = helper.make_graph(nodes, "colour", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3, size, size])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", len(LABELS)])],
                              initializer=[numpy_helper.from_array(w, "W"), numpy_helper.from_array(b, "B")])
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m.SerializeToString()


def colour_bundle(root: Path) -> Path:
    b = make_bundle(root)
    model = colour_model()
    (b / "model.int8.onnx").write_bytes(model)
    (b / "model.fp32.onnx").write_bytes(model)
    m = default_manifest()
    m["preprocessing"]["color_constancy"] = "none"
    write_manifest(b, m)
    return b


def source(root: Path, colours: dict[str, str], n: int = 6) -> Path:
    """HAM10000 layout: n images per label, each a flat patch of that label's colour."""
    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True)
    rows = []
    for dx, colour in colours.items():
        for i in range(n):
            rgb = np.clip(np.full((64, 64, 3), COLOURS[colour]) + rng.normal(0, 3, (64, 64, 3)), 0, 255).astype(np.uint8)
            iid = f"{dx}_{i}"
            cv2.imwrite(str(root / "images" / f"{iid}.png"), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
            rows.append({"image_id": iid, "dx": dx, "lesion_id": iid})
    with open(root / "labels.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["image_id", "dx", "lesion_id"])
        w.writeheader()
        w.writerows(rows)
    return root


def test_per_source_numbers_are_the_known_answers(tmp_path: Path) -> None:
    bundle = colour_bundle(tmp_path / "b")
    right = source(tmp_path / "right", {"mel": "red", "nv": "green", "bkl": "blue"})
    wrong = source(tmp_path / "wrong", {"mel": "green", "nv": "red"})
    res = evaluate_bundle(bundle, [f"right={right}", f"wrong={wrong}"], reps=200, log=lambda m: None)
    r, w = res["sources"]["right"], res["sources"]["wrong"]
    assert res["variant"] == "int8" and r["n"] == 18 and w["n"] == 12
    assert r["classes"] == ["bkl", "mel", "nv"] and w["classes"] == ["mel", "nv"]  # only what each source labels
    assert r["mel_auc"] == 1.0 and r["balanced_accuracy"] == 1.0 and r["mel_auc_ci"] == (1.0, 1.0)
    assert r["flag_rules"]["melanoma"]["sensitivity"] == 1.0 and r["benign_unflagged"] == 1.0
    assert w["mel_auc"] == 0.0 and w["balanced_accuracy"] == 0.0
    assert w["flag_rules"]["melanoma"]["sensitivity"] == 0.0 and w["benign_unflagged"] == 0.0
    assert r["confusion"] == [[6, 0, 0], [0, 6, 0], [0, 0, 6]] and w["confusion"] == [[0, 6], [6, 0]]


def test_cli_writes_markdown_json_and_plots_and_scores_a_split_subset(tmp_path: Path) -> None:
    bundle = colour_bundle(tmp_path / "b")
    right = source(tmp_path / "right", {"mel": "red", "nv": "green", "bkl": "blue"})
    split = tmp_path / "split.csv"
    with open(split, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image_id", "source", "label", "group", "split"])
        for dx in ("mel", "nv", "bkl"):
            for i in range(6):
                w.writerow([f"{dx}_{i}", "right", dx, f"{dx}_{i}", "test" if i < 2 else "train"])
    out = tmp_path / "eval"
    r = subprocess.run([sys.executable, "-m", "build_model", "evaluate", "--bundle", str(bundle), "--data", f"right={right}",
                        "--split", str(split), "--subset", "test", "--out", str(out), "--bootstrap", "100"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "| right | 6 | 1.000" in r.stdout
    data = json.loads((out / "evaluation.json").read_text())
    assert data["sources"]["right"]["n"] == 6 and data["subset"] == "test"
    assert (out / "evaluation.md").read_text().startswith("## Evaluation of")
    assert (out / "evaluation-right.png").read_bytes()[:4] == b"\x89PNG"


def test_a_label_the_bundle_does_not_know_is_a_clear_error(tmp_path: Path) -> None:
    bundle = colour_bundle(tmp_path / "b")
    odd = source(tmp_path / "odd", {"mel": "red", "nv": "green"})
    rows = (odd / "labels.csv").read_text().replace("nv_0,nv,", "nv_0,freckle,")
    (odd / "labels.csv").write_text(rows)
    r = subprocess.run([sys.executable, "-m", "build_model", "evaluate", "--bundle", str(bundle), "--data", str(odd)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode != 0 and "freckle" in r.stderr and "Traceback" not in r.stderr
