"""The whole build on a tiny generated HAM10000-layout dataset, through the real CLI.

Small image size and one epoch keep it to a minute on two cores; everything
else (pretrained weights, ONNX export and parity, INT8 calibration candidates,
gate, temperature, thresholds, bundle, verify) is the real code path.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from build_model.model import EfficientNetLite0, load_imagenet, padding_check, same_pads
from edge_agent.bundle import load_bundle, verify_bundle
from tests.build_fixtures import make_ham
from tests.bundle_factory import TEST_PRIVATE_KEY

TINY = ["--image-size", "64", "--batch-size", "8", "--threads", "2", "--max-source-side", "80"]


def cli(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "build_model", *args], capture_output=True, text=True, timeout=timeout)


def test_tf_same_padding_matches_tensorflow_rule() -> None:
    assert same_pads(160, 3, 2) == (0, 1)      # TF pads bottom/right only
    assert same_pads(40, 5, 2) == (1, 2)
    assert same_pads(20, 5, 1) == (2, 2)


def test_pretrained_weights_load_every_key_and_prefer_tf_padding() -> None:
    m = EfficientNetLite0(1000, 224)
    rep = load_imagenet(m)
    assert rep.matched == rep.total and not rep.missing and not rep.unexpected
    scores = padding_check(image_size=224, crops=4)
    assert max(scores, key=lambda k: scores[k]["mean_logp_true"]) == "tf+127/128"


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("build")
    data = make_ham(root / "ham", lesions_per_class=5, images_per_lesion=2)
    out = root / "bundle"
    r = cli("all", "--data", str(data), "--out", str(out), "--epochs", "1", "--calib-size", "14",
            "--adaround-iters", "10", "--signing-key", str(TEST_PRIVATE_KEY), *TINY)
    assert r.returncode == 0, r.stderr[-4000:]
    return out, root / "bundle.work"


def test_all_writes_a_bundle_the_agent_accepts(built: tuple[Path, Path]) -> None:
    out, work = built
    rep = verify_bundle(out)
    assert rep.ok, rep.errors
    m = rep.manifest
    assert sorted(p.name for p in out.iterdir()) == ["head.npz", "manifest.json", "manifest.sig", "model.fp32.onnx",
                                                     "model.int8.onnx", "ood.npz", "report.md", "split.csv"]
    assert m["format_version"] == 3 and m["features"]["output"] == "features"  # heatmaps and OOD statistics
    b = load_bundle(out)
    assert b.head is not None and b.ood is not None and b.ood.feature_dim == b.head.feature_dim
    assert rep.signature is not None and rep.signature.valid
    assert m["labels"] == ["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"]
    assert m["primary"] in ("int8", "fp32") and m["gate"]["approved"] == (m["primary"] == "int8")
    assert m["temperature"] > 0 and 0 < m["thresholds"]["melanoma"]["probability"] <= 1
    assert "test_sensitivity" in m["thresholds"]["malignant"]
    assert "CC BY-NC 4.0" in m["license"] and "Tschandl" in m["citation"]
    quant = json.loads((work / "quantize.json").read_text())
    assert {(c["method"], c["reduce_range"], c["adaround"]) for c in quant["candidates"]} == {
        (meth, rr, False) for meth in ("MinMax", "Entropy", "Percentile") for rr in (False, True)} | {("MinMax", False, True)}
    assert len(quant["adaround"]["layers"]) > 40 and quant["adaround"]["iters"] == 10
    assert (work / "candidates" / "minmax-rr0-ada.onnx").exists()
    assert json.loads((work / "export.json").read_text())["passed"]
    report = (out / "report.md").read_text()
    assert "FP32 vs INT8" in report and "Confusion matrix" in report and "not a diagnostic device" in report


def test_qat_epochs_fine_tune_for_int8_and_export_that_model(tmp_path: Path) -> None:
    data = make_ham(tmp_path / "ham", lesions_per_class=4, images_per_lesion=2)
    out, work = tmp_path / "bundle", tmp_path / "bundle.work"
    r = cli("all", "--data", str(data), "--out", str(out), "--epochs", "1", "--calib-size", "14", "--qat-epochs", "1",
            "--adaround-iters", "0", *TINY)
    assert r.returncode == 0, r.stderr[-4000:]
    assert "quantization-aware fine-tuning: 1 epochs" in r.stderr and "int8-sim agreement" in r.stderr
    m = verify_bundle(out).manifest
    assert m["training"]["config"]["qat"] is True and m["training"]["config"]["init_from"] == str(work / "best.pt")
    assert json.loads((work / "qat" / "export.json").read_text())["passed"]
    # Trained for ORT's MinMax ranges: the other calibration recipes are not tried on a QAT model.
    quant = json.loads((work / "qat" / "quantize.json").read_text())
    assert [(c["method"], c["reduce_range"]) for c in quant["candidates"]] == [("MinMax", False)]
    assert quant["adaround"] is None  # --adaround-iters 0 skips it


def test_verify_command_accepts_then_rejects_a_tampered_bundle(built: tuple[Path, Path], tmp_path: Path) -> None:
    import shutil

    out, _ = built
    r = cli("verify", str(out))
    assert r.returncode == 0 and "OK" in r.stdout
    bad = tmp_path / "bad"
    shutil.copytree(out, bad)
    with open(bad / "model.int8.onnx", "r+b") as f:
        f.seek(200)
        f.write(b"\x00\x01\x02\x03")
    r = cli("verify", str(bad))
    assert r.returncode != 0 and "model.int8.onnx" in r.stderr


def test_training_survives_sigkill_and_resumes(tmp_path: Path) -> None:
    data = make_ham(tmp_path / "ham", lesions_per_class=4, images_per_lesion=2)
    out, work = tmp_path / "b", tmp_path / "w"
    args = ["train", "--data", str(data), "--out", str(out), "--workdir", str(work), "--epochs", "2",
            "--ckpt-every", "1", *TINY]
    p = subprocess.Popen([sys.executable, "-m", "build_model", *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (work / "last.pt").exists() and time.time() < deadline and p.poll() is None:
        time.sleep(0.2)
    time.sleep(1.0)
    p.send_signal(signal.SIGKILL)
    p.wait()
    step_at_kill = torch.load(work / "last.pt", weights_only=False)["state"]["step"]
    assert step_at_kill >= 1
    r = cli(*args)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"resumed at step {step_at_kill}" in r.stderr or "resumed at step" in r.stderr
    state = torch.load(work / "last.pt", weights_only=False)["state"]
    assert [h["epoch"] for h in state["history"]] == [1, 2]
    assert (work / "best.pt").exists()


def test_a_kill_between_the_last_step_and_its_validation_is_validated_on_resume(tmp_path: Path) -> None:
    """The checkpoint after an epoch's last step, then a kill before that epoch's validation: the resumed run
    must validate the epoch (and choose best.pt), not see 'all steps done' and skip it."""
    data = make_ham(tmp_path / "ham", lesions_per_class=4, images_per_lesion=2)
    out, work = tmp_path / "b", tmp_path / "w"
    args = ["train", "--data", str(data), "--out", str(out), "--workdir", str(work), "--epochs", "1", *TINY]
    assert cli(*args).returncode == 0
    ck = torch.load(work / "last.pt", weights_only=False)
    ck["state"]["history"], ck["state"]["best"], ck["state"]["best_epoch"] = [], -1.0, -1
    torch.save(ck, work / "last.pt")
    (work / "best.pt").unlink()
    r = cli(*args)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "epoch 1:" in r.stderr and (work / "best.pt").exists()
    assert [h["epoch"] for h in torch.load(work / "last.pt", weights_only=False)["state"]["history"]] == [1]


def test_validate_and_bundle_with_two_views_ship_a_format_5_bundle(built: tuple[Path, Path], tmp_path: Path) -> None:
    """`--views`: the gate, temperature, thresholds and OOD statistics on the mean over both views, shipped in
    the manifest the agent reads (a copy of the built workdir, so the other tests keep theirs)."""
    import shutil

    from tests.test_build_errors import one_line_error

    out0, work0 = built
    data, out, work = out0.parent / "ham", tmp_path / "bundle", tmp_path / "bundle.work"
    shutil.copytree(out0, out)
    shutil.copytree(work0, work)
    args = ["--data", str(data), "--out", str(out), "--workdir", str(work)]
    line = one_line_error(cli("validate", *args, "--views", "lesion_crop,shorter_side_center_crop"))
    assert "the first being resize 'shorter_side_center_crop'" in line
    line = one_line_error(cli("validate", *args, "--views", "lesion_crop"), 2)
    assert "two or more different resize rules" in line
    r = cli("validate", *args, "--views", "shorter_side_center_crop,lesion_crop")
    assert r.returncode == 0, r.stderr[-4000:]
    val, val0 = (json.loads((w / "validate.json").read_text()) for w in (work, work0))
    assert val["views"] == ["shorter_side_center_crop", "lesion_crop"] and "views" not in val0
    assert val["temperature"] != val0["temperature"]  # calibrated on the two views' mean, not the one view
    r = cli("bundle", *args, "--signing-key", str(TEST_PRIVATE_KEY))
    assert r.returncode == 0, r.stderr[-4000:]
    rep = verify_bundle(out)
    assert rep.ok, rep.errors
    assert rep.manifest["format_version"] == 5 and rep.manifest["model_id"].endswith("-2views")
    assert not any("model_id" in w for w in rep.warnings), rep.warnings  # the suffix is known to the agent
    assert rep.manifest["preprocessing"]["views"] == ["shorter_side_center_crop", "lesion_crop"]
    b = load_bundle(out)
    assert b.preprocessing.n_views == 2 and b.ood is not None
    old = json.loads((out0 / "manifest.json").read_text())
    assert old["ood"]["thresholds"] != rep.manifest["ood"]["thresholds"]  # refitted on the mean of both views
    assert "the `shorter_side_center_crop` square and the `lesion_crop` square" in (out / "report.md").read_text()
