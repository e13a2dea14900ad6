"""The whole build on two generated sources (the second labels only mel/nv/bkl), through the real CLI:
per-source splits, masked loss, the new augmentations, flip TTA, per-source thresholds, the bundle's record."""
from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

from edge_agent.bundle import load_bundle
from tests.build_fixtures import make_ham, make_isic_like
from tests.bundle_factory import TEST_PRIVATE_KEY

TINY = ["--image-size", "64", "--batch-size", "8", "--threads", "2", "--max-source-side", "80"]


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "build_model", *args], capture_output=True, text=True, timeout=900)


def test_two_source_build_records_sources_and_ships_a_tta_bundle_the_agent_loads(tmp_path: Path) -> None:
    ham = make_ham(tmp_path / "ham", lesions_per_class=5, images_per_lesion=2)
    isic = make_isic_like(tmp_path / "isic", lesions_per_class=8)
    out = tmp_path / "bundle"
    r = cli("all", "--data", f"ham10000={ham}", "--data", f"isic2017={isic}", "--out", str(out), "--epochs", "1",
            "--calib-size", "14", "--adaround-iters", "0", "--augment", "artefacts,zoom,aspect,strong_color",
            "--source-power", "0.5", "--tta", "hflip", "--signing-key", str(TEST_PRIVATE_KEY), *TINY)
    assert r.returncode == 0, r.stderr[-4000:]
    assert "sources: ham10000 (70 images" in r.stderr and "isic2017 (24 images, classes bkl,mel,nv)" in r.stderr
    b = load_bundle(out)
    m = b.manifest
    assert b.tta == "hflip" and m["format_version"] == 3 and m["model_id"].startswith("ham10000+isic2017-lite0-64-") \
        and m["model_id"].endswith("-hflip")
    assert m["sources"]["isic2017"]["labels"] == ["bkl", "mel", "nv"]
    assert m["training"]["config"]["masked_loss"] is True and m["training"]["config"]["augment"].startswith("artefacts")
    assert "Codella" in m["citation"] and "Tschandl" in m["citation"] and "NonCommercial" in m["license"]
    assert "per_source_thresholds" in m["thresholds"]["melanoma"] or "val_by_source" in m["thresholds"]["melanoma"]
    rows = list(csv.DictReader(open(out / "split.csv")))
    assert {r["source"] for r in rows} == {"ham10000", "isic2017"}
    assert {r["split"] for r in rows if r["source"] == "isic2017"} == {"train", "val", "test"}
    ev = cli("evaluate", "--bundle", str(out), "--data", f"ham10000={ham}", "--data", f"isic2017={isic}",
             "--split", str(out / "split.csv"), "--subset", "test", "--bootstrap", "50", "--out", str(tmp_path / "ev"))
    assert ev.returncode == 0, ev.stderr[-3000:]
    res = json.loads((tmp_path / "ev" / "evaluation.json").read_text())
    assert set(res["sources"]) == {"ham10000", "isic2017"} and res["tta"] == "hflip"
    assert res["sources"]["isic2017"]["classes"] == ["bkl", "mel", "nv"]


def test_holdout_source_is_left_out_of_training(tmp_path: Path) -> None:
    ham = make_ham(tmp_path / "ham", lesions_per_class=4, images_per_lesion=2)
    isic = make_isic_like(tmp_path / "isic", lesions_per_class=4)
    out = tmp_path / "b"
    r = cli("train", "--data", f"ham10000={ham}", "--data", f"isic2017={isic}", "--holdout-source", "isic2017",
            "--out", str(out), "--epochs", "1", *TINY)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "train 28 images" in r.stderr and "sources {'ham10000': 28, 'isic2017': 0}" in r.stderr
    rows = list(csv.DictReader(open(out / "split.csv")))
    assert {r["split"] for r in rows if r["source"] == "isic2017"} == {"holdout"}
    bad = cli("train", "--data", f"ham10000={ham}", "--holdout-source", "nope", "--out", str(tmp_path / "c"), "--epochs", "1", *TINY)
    assert bad.returncode != 0 and "not one of the sources" in bad.stderr and "Traceback" not in bad.stderr
