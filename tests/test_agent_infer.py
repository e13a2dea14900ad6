"""Inference: INT8 -> FP32 fallback when the primary cannot load, spot-check disagreements."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from bundle_factory import make_bundle, write_manifest
from conftest import rows, scan_now
from edge_agent.bundle import load_bundle
from edge_agent.cli import main
from edge_agent.infer import Engine, InferenceError


def test_engine_runs_batches(bundle_dir: Path) -> None:
    b = load_bundle(bundle_dir)
    eng = Engine(b, threads=1)
    assert eng.load() == "int8" and not eng.is_fallback
    x = np.random.default_rng(0).standard_normal((5, 3, 32, 32)).astype(np.float32)
    logits, variant = eng.infer(x)
    assert logits.shape == (5, 7) and variant == "int8"
    one, _ = eng.infer(x[:1])
    assert np.allclose(one[0], logits[0], atol=1e-5)  # batching does not change answers


def test_unloadable_int8_falls_back_to_fp32_and_every_result_says_so(
        dirs: dict[str, Path], tmp_path: Path, example_images: list[Path]) -> None:
    bundle = make_bundle(tmp_path / "b", int8_bytes=b"\x08\x01garbage that is not a protobuf model")
    for p in example_images[:4]:
        shutil.copy(p, dirs["inbox"])
    code, agent = scan_now(dirs, bundle)
    assert code == 0 and agent.engine.is_fallback
    res = rows(dirs["db"], "SELECT model_variant, fallback FROM results")
    assert len(res) == 4 and all(r["model_variant"] == "fp32" and r["fallback"] == 1 for r in res)
    ev = rows(dirs["db"], "SELECT detail FROM events WHERE kind = 'fallback'")
    assert len(ev) == 1 and "int8 failed to load" in ev[0]["detail"]
    st = CliRunner().invoke(main, ["status", "--db", str(dirs["db"]), "--json"])
    assert st.exit_code == 1  # a warning: more than 5% of recent results came from the fallback
    s = json.loads(st.output)
    assert s["fallback_results"] == 4 and any("fallback model" in w for w in s["warnings"])


def test_no_fallback_allowed_fails_loudly_and_keeps_the_files(
        dirs: dict[str, Path], tmp_path: Path, example_images: list[Path]) -> None:
    bundle = make_bundle(tmp_path / "b", int8_bytes=b"not a model", fallback=None)
    shutil.copy(example_images[0], dirs["inbox"])
    with pytest.raises(InferenceError, match="allows no fallback"):
        scan_now(dirs, bundle)
    assert (dirs["inbox"] / example_images[0].name).exists()
    assert rows(dirs["db"], "SELECT count(*) FROM results")[0][0] == 0


def test_primary_failing_at_run_time_switches_to_fallback(tmp_path: Path) -> None:
    """An INT8 graph that loads but cannot run on this input (wrong input size) -> FP32 takes over."""
    bad = make_bundle(tmp_path / "bad", size=16)  # a 16x16 model, checksummed
    bundle = make_bundle(tmp_path / "b")
    shutil.copy(bad / "model.int8.onnx", bundle / "model.int8.onnx")
    m = json.loads((bundle / "manifest.json").read_text())
    write_manifest(bundle, m)
    events: list[tuple[str, str]] = []
    eng = Engine(load_bundle(bundle), on_event=lambda k, d: events.append((k, d)))
    assert eng.load() == "int8"
    logits, variant = eng.infer(np.zeros((2, 3, 32, 32), np.float32))
    assert variant == "fp32" and logits.shape == (2, 7) and events[0][0] == "fallback"


def test_spot_check_flags_disagreements(dirs: dict[str, Path], tmp_path: Path, example_images: list[Path]) -> None:
    bundle = make_bundle(tmp_path / "b", int8_seed=7)  # INT8 weights differ from FP32: they will disagree
    for p in example_images:
        shutil.copy(p, dirs["inbox"])
    assert scan_now(dirs, bundle, spot_check_fraction=1.0)[0] == 0
    res = rows(dirs["db"], "SELECT label, spot_checked, spot_label, review_reasons FROM results")
    assert len(res) == 12 and all(r["spot_checked"] == 1 and r["spot_label"] for r in res)
    assert any("model_disagreement" in r["review_reasons"] for r in res)
    for r in res:
        if r["spot_label"] != r["label"]:
            assert "model_disagreement" in r["review_reasons"]


def test_identical_variants_never_disagree(dirs: dict[str, Path], bundle_dir: Path,
                                           example_images: list[Path]) -> None:
    for p in example_images:
        shutil.copy(p, dirs["inbox"])
    assert scan_now(dirs, bundle_dir, spot_check_fraction=1.0)[0] == 0
    res = rows(dirs["db"], "SELECT label, spot_label, review_reasons FROM results")
    assert all(r["spot_label"] == r["label"] and "model_disagreement" not in r["review_reasons"] for r in res)
