"""Build side of bundle format 3: the feature output added to real ONNX graphs, the head read from them, and
`build-model upgrade-bundle` on a real bundle and a real (synthetic) dataset."""
from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from build_fixtures import make_ham
from bundle_factory import TEST_PRIVATE_KEY, conv_classifier, default_manifest, reference_tensors, tiny_classifier, write_manifest
from build_model.explain import ExplainError, add_feature_output, feature_tensor, head_weights
from edge_agent.bundle import load_bundle


def test_feature_output_changes_no_logit_and_the_head_is_the_classifier(tmp_path: Path) -> None:
    model, w, b = conv_classifier(seed=3, features_output=False)
    src, dst = tmp_path / "m.onnx", tmp_path / "m3.onnx"
    src.write_bytes(model)
    add_feature_output(src, dst)
    x = reference_tensors()[:4]
    old = ort.InferenceSession(str(src), providers=["CPUExecutionProvider"]).run(["logits"], {"input": x})[0]
    new, fmap = ort.InferenceSession(str(dst), providers=["CPUExecutionProvider"]).run(["logits", "features"],
                                                                                       {"input": x})
    assert np.array_equal(old, new) and fmap.shape[:2] == (4, 8)
    hw, hb = head_weights(onnx.load(str(dst)))
    assert np.allclose(hw, w) and np.allclose(hb, b)
    assert np.allclose(fmap.mean(axis=(2, 3)) @ hw.T + hb, new, atol=1e-4)


def test_a_graph_without_a_pooled_feature_map_is_refused_with_the_reason(tmp_path: Path) -> None:
    m = onnx.load_from_string(tiny_classifier())  # avg- and max-pool concatenated: no single feature map
    with pytest.raises(ExplainError, match="not a global average pool of a feature map"):
        feature_tensor(m)


def _format1_conv_bundle(folder: Path, ham: Path) -> Path:
    folder.mkdir(parents=True)
    model, _, _ = conv_classifier(seed=1, features_output=False)
    (folder / "model.fp32.onnx").write_bytes(model)
    (folder / "model.int8.onnx").write_bytes(model)
    ids = [r["image_id"] for r in csv.DictReader(open(ham / "labels.csv"))]
    with open(folder / "split.csv", "w", newline="") as f:
        wr = csv.writer(f)
        wr.writerow(["image_id", "source", "label", "group", "split"])
        for k, iid in enumerate(ids):
            wr.writerow([iid, "ham10000", "nv", f"g{k}", "val" if k % 3 == 0 else "train"])
    (folder / "report.md").write_text("# test\n")
    write_manifest(folder, default_manifest())
    return folder


def _upgrade(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "build_model", "upgrade-bundle", *args], capture_output=True,
                          text=True, timeout=300)


def test_upgrade_bundle_adds_features_head_and_ood_and_keeps_the_logits(tmp_path: Path) -> None:
    ham = make_ham(tmp_path / "ham", lesions_per_class=3, images_per_lesion=2)
    old = _format1_conv_bundle(tmp_path / "old", ham)
    out = tmp_path / "new"
    r = _upgrade(str(old), "--data", f"ham10000={ham}", "--out", str(out), "--signing-key", str(TEST_PRIVATE_KEY),
                 "--max-fit-images", "100", "--threads", "1")
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = load_bundle(old), load_bundle(out)
    m = b.manifest
    assert m["format_version"] == 3 and b.head is not None and b.ood is not None
    assert m["upgraded_from"]["model_id"] == a.model_id and b.model_id != a.model_id
    assert m["thresholds"] == a.manifest["thresholds"] and m["temperature"] == a.manifest["temperature"]
    assert m["ood"]["fit"]["train_images"] == 28 and m["ood"]["fit"]["val_images"] == 14
    from edge_agent.infer import Engine

    x = reference_tensors()[:3]
    ea, eb = Engine(a), Engine(b)
    assert np.array_equal(ea.infer(x)[0], eb.infer(x)[0])
    again = _upgrade(str(out), "--data", f"ham10000={ham}", "--out", str(tmp_path / "third"))
    assert again.returncode == 1 and "already format 3" in again.stderr and "Traceback" not in again.stderr
    busy = _upgrade(str(old), "--data", f"ham10000={ham}", "--out", str(out))
    assert busy.returncode == 1 and "not empty" in busy.stderr
    wrong = _upgrade(str(old), "--data", f"ham10000={tmp_path / 'nothere'}", "--out", str(tmp_path / "x"))
    assert wrong.returncode != 0 and "Traceback" not in wrong.stderr
    assert json.loads((old / "manifest.json").read_text())["format_version"] == 1  # the source bundle untouched
