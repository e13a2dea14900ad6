"""Bundle format 3: the feature output, the classifier head and the OOD statistics, on real ONNX models."""
from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest

from bundle_factory import conv_classifier, make_bundle, make_bundle_v3, reference_tensors, write_manifest
from conftest import rows, scan_now
from edge_agent import ood
from edge_agent.bundle import BundleError, default_bundle_path, load_bundle, verify_bundle
from edge_agent.decode import QualityLimits, decode_image
from edge_agent.infer import Engine
from edge_agent.store import connect


@pytest.fixture(scope="module")
def v3(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_bundle_v3(tmp_path_factory.mktemp("v3") / "bundle")


def noise_jpeg(path: Path, seed: int = 0) -> Path:
    cv2.imwrite(str(path), np.random.default_rng(seed).integers(0, 256, (300, 400, 3), dtype=np.uint8))
    return path


def text_png(path: Path) -> Path:
    im = np.full((300, 400, 3), 245, np.uint8)
    for k, line in enumerate(("Referral letter", "Patient: J. Smith", "Please see the attached", "images. Regards")):
        cv2.putText(im, line, (10, 40 + 55 * k), cv2.FONT_HERSHEY_SIMPLEX, 1.0, (20, 20, 20), 2, cv2.LINE_AA)
    cv2.imwrite(str(path), im)
    return path


def test_format3_bundle_loads_its_head_and_ood_statistics(v3: Path) -> None:
    b = load_bundle(v3)
    assert b.manifest["format_version"] == 3 and b.features_output == "features"
    assert b.head is not None and b.head.weight.shape == (7, 8) and b.head.bias.shape == (7,)
    assert b.ood is not None and b.ood.feature_dim == 8 and set(b.ood.thresholds) == {"int8", "fp32"}
    assert b.why_no_heatmap is None and b.why_no_ood is None


def test_an_older_bundle_still_runs_and_says_why_there_is_no_heatmap_or_ood(bundle_dir: Path) -> None:
    b = load_bundle(bundle_dir)
    assert b.head is None and b.ood is None and b.features_output is None
    assert "format version 1" in b.why_no_heatmap and "no feature output" in b.why_no_heatmap
    assert "out-of-distribution" in b.why_no_ood
    e = Engine(b)
    e.load()
    x = reference_tensors()[:2]
    logits, pooled, variant = e.infer_features(x)
    assert logits.shape == (2, 7) and pooled is None and e.feature_maps(x) is None


def test_pooled_features_through_the_head_are_the_logits(v3: Path) -> None:
    """The head and the feature output describe the model exactly: W . mean(F) + b == logits."""
    b = load_bundle(v3)
    e = Engine(b)
    e.load()
    x = reference_tensors()[:5]
    logits, pooled, _ = e.infer_features(x)
    maps = e.feature_maps(x)
    assert maps.shape[:2] == (5, 8) and np.allclose(maps.mean(axis=(2, 3)), pooled, atol=1e-6)
    assert np.allclose(pooled @ b.head.weight.T + b.head.bias, logits, atol=1e-4)
    plain, _ = e.infer(x)
    assert np.array_equal(plain, logits)


def test_the_shipped_bundle_is_format3_and_its_head_reproduces_its_logits(example_images: list[Path]) -> None:
    b = load_bundle(default_bundle_path())
    assert b.manifest["format_version"] == 3 and b.ood is not None and b.head is not None
    e = Engine(b)
    e.load()
    x = np.stack([decode_image(p.read_bytes(), b.preprocessing, 64_000_000, QualityLimits()).tensor
                  for p in example_images[:4]])
    logits, pooled, variant = e.infer_features(x)
    assert variant == "int8" and pooled.shape == (4, b.head.feature_dim)
    assert np.allclose(pooled @ b.head.weight.T + b.head.bias, logits, atol=2e-3)
    noise = decode_image(noise_jpeg(Path(__import__("tempfile").mkdtemp()) / "n.jpg").read_bytes(), b.preprocessing,
                         64_000_000, QualityLimits()).tensor[None]
    _, pn, _ = e.infer_features(noise)
    assert b.ood.flags(b.ood.score(pn, variant), variant)[0]  # a noise picture is not a lesion
    assert not b.ood.flags(b.ood.score(pooled, variant), variant).any()  # the committed dermoscopy examples are


def test_scan_flags_noise_and_a_text_page_as_out_of_distribution(dirs: dict[str, Path], v3: Path,
                                                               example_images: list[Path]) -> None:
    noise_jpeg(dirs["inbox"] / "noise.jpg")
    text_png(dirs["inbox"] / "letter.png")
    for p in example_images[:4]:
        shutil.copy(p, dirs["inbox"])
    code, _ = scan_now(dirs, v3)
    assert code == 0
    got = {r["original_name"]: r for r in rows(dirs["db"], "SELECT * FROM results")}
    for name in ("noise.jpg", "letter.png"):
        assert "out_of_distribution" in got[name]["review_reasons"].split(",") and got[name]["needs_review"] == 1
        assert got[name]["ood_score"] > load_bundle(v3).ood.thresholds["int8"]
    for p in example_images[:4]:
        r = got[p.name]
        assert r["ood_score"] is not None and "out_of_distribution" not in r["review_reasons"]


def test_results_of_an_older_bundle_have_no_ood_score(dirs: dict[str, Path], bundle_dir: Path) -> None:
    noise_jpeg(dirs["inbox"] / "noise.jpg")
    assert scan_now(dirs, bundle_dir)[0] == 0
    (r,) = rows(dirs["db"], "SELECT ood_score, review_reasons FROM results")
    assert r["ood_score"] is None and "out_of_distribution" not in r["review_reasons"]


def _resign(bundle: Path, **changes) -> None:
    m = json.loads((bundle / "manifest.json").read_text())
    m.update(changes)
    write_manifest(bundle, m, model_id=m["model_id"])


@pytest.mark.parametrize("case, change, message", [
    ("format 2 with features", lambda b: _resign(b, format_version=2), "older agents would ignore it"),
    ("ood without features", lambda b: _drop_features(b), "no 'features' output"),
    ("unknown method", lambda b: _set_ood(b, method="knn"), "not one this agent knows"),
    ("threshold not positive", lambda b: _set_ood(b, thresholds={"int8": 0, "fp32": 1.0}), "must be a positive number"),
    ("features names logits", lambda b: _resign(b, features={"output": "logits", "head": "head.npz"}),
     "names the logits tensor"),
    ("head not listed", lambda b: _resign(b, features={"output": "features", "head": "nothere.npz"}),
     "not listed (checksummed)"),
    ("ood arrays of the wrong shape", lambda b: _replace_ood(b, np.ones((3, 3)), np.ones((2, 3))),
     "statistics have 3 features but the classifier reads 8"),
    ("ood file not an npz", lambda b: _replace_file(b, "ood.npz", b"not a zip"), "cannot be read"),
    ("head of the wrong shape", lambda b: _replace_head(b, np.ones((5, 8)), np.ones(5)), "one row per label"),
])
def test_a_bad_format3_bundle_is_refused_with_the_reason(tmp_path: Path, v3: Path, case: str, change, message: str
                                                         ) -> None:
    b = tmp_path / "b"
    shutil.copytree(v3, b)
    change(b)
    rep = verify_bundle(b)
    if rep.ok:  # content problems inside listed, checksummed files show at load
        with pytest.raises(BundleError, match="refusing to use the model bundle") as e:
            load_bundle(b)
        text = str(e.value)
    else:
        text = " ".join(rep.errors)
    assert message in text, (case, text)


def test_a_modified_ood_file_fails_its_checksum(tmp_path: Path, v3: Path) -> None:
    b = tmp_path / "b"
    shutil.copytree(v3, b)
    data = bytearray((b / "ood.npz").read_bytes())
    data[-40] ^= 0xFF
    (b / "ood.npz").write_bytes(bytes(data))
    rep = verify_bundle(b)
    assert not rep.ok and any("ood.npz does not match its sha256" in e for e in rep.errors)


def _drop_features(b: Path) -> None:
    m = json.loads((b / "manifest.json").read_text())
    del m["features"]
    write_manifest(b, m, model_id=m["model_id"])


def _set_ood(b: Path, **kw) -> None:
    m = json.loads((b / "manifest.json").read_text())
    m["ood"].update(kw)
    write_manifest(b, m, model_id=m["model_id"])


def _replace_file(b: Path, name: str, data: bytes) -> None:
    (b / name).write_bytes(data)
    m = json.loads((b / "manifest.json").read_text())
    write_manifest(b, m, model_id=m["model_id"])


def _replace_ood(b: Path, w: np.ndarray, m_: np.ndarray) -> None:
    buf = io.BytesIO()
    np.savez(buf, int8_whiten=w, int8_means=m_, fp32_whiten=w, fp32_means=m_)
    _replace_file(b, "ood.npz", buf.getvalue())


def _replace_head(b: Path, w: np.ndarray, bias: np.ndarray) -> None:
    buf = io.BytesIO()
    np.savez(buf, weight=w, bias=bias)
    _replace_file(b, "head.npz", buf.getvalue())


def test_ood_arithmetic_finds_the_nearest_class_centre() -> None:
    """Known answer: two classes at +-5 on the first axis, unit covariance: a point at the centre of class 1
    scores 0, one 3 units beyond it on a second axis scores 9 / dims."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((4000, 4)) + [5, 0, 0, 0]
    b = rng.standard_normal((4000, 4)) - [5, 0, 0, 0]
    w, m = ood.fit(np.concatenate([a, b]), np.repeat([0, 1], 4000), shrinkage=0.0)
    s = ood.score(np.array([[-5, 0, 0, 0], [-5, 3, 0, 0], [0, 0, 0, 0]], np.float32), w, m)
    assert s[0] == pytest.approx(0, abs=0.02) and s[1] == pytest.approx(9 / 4, rel=0.05)
    assert s[2] == pytest.approx(25 / 4, rel=0.05)


def test_version_2_database_gains_the_ood_column_and_keeps_its_rows(tmp_path: Path) -> None:
    import sqlite_utils

    from edge_agent.store import SCHEMA_VERSION, _migration_1, _migration_2, migrate

    conn = connect(tmp_path / "v2.db")
    d = sqlite_utils.Database(conn)
    _migration_1(d)
    _migration_2(d)
    conn.execute("PRAGMA user_version = 2")
    conn.execute("INSERT INTO results (sha256, original_name, original_path, file_state, received_at, processed_at, "
                 "model_id, model_variant, label, confidence, probabilities) VALUES ('a', 'x.jpg', '/x.jpg', 'moved', "
                 "'t', 't', 'm', 'int8', 'nv', 0.9, '{}')")
    conn.commit()
    migrate(conn, ["nv"])
    assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    assert "ood_score" in {r[1] for r in conn.execute("PRAGMA table_info(results)")}
    assert [tuple(r) for r in conn.execute("SELECT original_name, ood_score FROM results")] == [("x.jpg", None)]
    conn.close()


def test_factory_models_without_the_feature_output_have_the_same_logits() -> None:
    """The fixture's own premise (as the build's upgrade proves for real models): the extra output changes nothing."""
    import onnxruntime as ort

    with_f, _, _ = conv_classifier(features_output=True)
    without, _, _ = conv_classifier(features_output=False)
    x = reference_tensors()[:3]
    a = ort.InferenceSession(with_f, providers=["CPUExecutionProvider"]).run(["logits"], {"input": x})[0]
    b = ort.InferenceSession(without, providers=["CPUExecutionProvider"]).run(["logits"], {"input": x})[0]
    assert np.array_equal(a, b)


def test_make_bundle_default_is_still_format_1(tmp_path: Path) -> None:
    assert json.loads((make_bundle(tmp_path / "b") / "manifest.json").read_text())["format_version"] == 1


def test_model_info_says_whether_the_bundle_checks_ood_and_can_draw_heatmaps(bundle_dir: Path, v3: Path) -> None:
    from click.testing import CliRunner

    from edge_agent.cli import main

    old = CliRunner().invoke(main, ["model", "info", str(bundle_dir)])
    assert "ood check:     off: the bundle (format 1)" in old.output and "heatmaps:      no" in old.output
    new = CliRunner().invoke(main, ["model", "info", str(v3)])
    assert "ood check:     mahalanobis-tied, flag above" in new.output and "heatmaps:      yes" in new.output


def test_ood_fit_of_dead_features_stays_finite_and_is_stored_exactly(tmp_path: Path) -> None:
    """A barely trained model has features that are always 0: the fit must stay finite (no NaN in a manifest)
    and a whitening matrix beyond float16's range is stored as float32 (build-model all on toy data found it)."""
    rng = np.random.default_rng(1)
    x = np.concatenate([rng.random((50, 3)), np.zeros((50, 2))], axis=1)  # two dead features
    w, m = ood.fit(x, np.repeat([0, 1], 25), shrinkage=0.0)
    assert np.all(np.isfinite(w)) and np.all(np.isfinite(m)) and np.abs(w).max() > 6e4
    ood.save(tmp_path / "o.npz", {"int8": (w, m), "fp32": (w, m)})
    spec = {"method": ood.METHOD, "thresholds": {"int8": 1.0, "fp32": 1.0}}
    got = ood.load((tmp_path / "o.npz").read_bytes(), spec, ["fp32", "int8"])
    assert np.array_equal(got.whiten["int8"], w) and np.all(np.isfinite(got.score(x, "int8")))
