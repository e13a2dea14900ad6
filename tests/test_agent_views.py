"""Multi-view bundles (`preprocessing.views`, format 5): each image screened as the centre square and the
square around its lesion, and the model's logits averaged over the views."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from bundle_factory import default_manifest, make_bundle, make_bundle_v3
from test_agent_lesion_crop import frame, stored_p_mel_is_the_bundles
from test_agent_tta import left_half_classifier

from edge_agent.bundle import FORMAT_VERSION, load_bundle, required_format_version, verify_bundle
from edge_agent.infer import Engine
from edge_agent.preprocess import Preprocessing, preprocess, preprocess_bgr

TWO = ["shorter_side_center_crop", "lesion_crop"]


def _views_manifest(size: int = 32, **pre: object) -> dict:
    m = default_manifest(size)
    m["preprocessing"] = {**m["preprocessing"], "views": TWO, "lesion_margin": 0.15, **pre}
    m["format_version"] = 5
    return m


def test_the_tensor_holds_each_view_in_order_and_one_view_keeps_the_old_shape() -> None:
    img = frame()  # a lesion off centre: the two squares differ
    pre = Preprocessing(input_size=64, views=tuple(TWO))
    x = preprocess(img, pre)
    assert x.shape == (2, 3, 64, 64) and x.dtype == np.float32
    assert np.array_equal(x[0], preprocess(img, Preprocessing(input_size=64)))
    assert np.array_equal(x[1], preprocess(img, Preprocessing(input_size=64, resize="lesion_crop")))
    assert not np.allclose(x[0], x[1])
    bgr = np.ascontiguousarray(img[..., ::-1])
    assert np.allclose(preprocess_bgr(bgr, pre), x, atol=1e-6)  # the agent's BGR entry point: the same views
    assert preprocess(img, Preprocessing(input_size=64)).shape == (3, 64, 64)
    assert pre.source_size == 128  # the lesion square is cut from a finer decode, as for a lesion_crop bundle


def test_views_round_trip_and_older_manifests_are_unchanged() -> None:
    assert "views" not in Preprocessing(input_size=192).to_dict()
    d = Preprocessing(input_size=192, views=tuple(TWO)).to_dict()
    assert d["views"] == TWO and d["resize"] == TWO[0] and "lesion_margin" in d
    assert Preprocessing.from_dict(d).views == tuple(TWO) and Preprocessing.from_dict(d).n_views == 2


@pytest.mark.parametrize("views, needle", [
    (["shorter_side_center_crop"], "two or more"),
    (["shorter_side_center_crop", "shorter_side_center_crop"], "two or more"),
    (["lesion_crop", "shorter_side_center_crop"], "the first being resize"),
    (["shorter_side_center_crop", "zoom"], "'zoom'"),
    ("lesion_crop", "must be a list"),
], ids=["one", "twice", "order", "unknown", "string"])
def test_a_bad_views_list_is_refused_with_the_reason(views: object, needle: str) -> None:
    with pytest.raises(ValueError, match=needle):
        Preprocessing.from_dict({**Preprocessing(input_size=64).to_dict(), "views": views})


def test_a_views_bundle_is_format_5_and_older_declarations_are_refused(tmp_path: Path) -> None:
    assert FORMAT_VERSION >= 5 and required_format_version(_views_manifest()) == 5
    assert load_bundle(make_bundle(tmp_path / "ok", **_views_manifest())).preprocessing.n_views == 2
    rep = verify_bundle(make_bundle(tmp_path / "v4", **{**_views_manifest(), "format_version": 4}))
    assert not rep.ok and any("several preprocessing views" in e and "format version 5" in e for e in rep.errors)
    odd = _views_manifest(views=["lesion_crop", "stretch"])
    rep = verify_bundle(make_bundle(tmp_path / "odd", **odd))
    assert not rep.ok and any("views" in e for e in rep.errors)


def test_the_engine_returns_the_mean_over_views_and_over_mirror_images(tmp_path: Path) -> None:
    left = left_half_classifier()
    plain = Engine(load_bundle(make_bundle(tmp_path / "plain", int8_bytes=left)))
    views = Engine(load_bundle(make_bundle(tmp_path / "views", int8_bytes=left, **_views_manifest())))
    both = Engine(load_bundle(make_bundle(tmp_path / "both", int8_bytes=left, tta="hflip", **_views_manifest())))
    x = np.random.default_rng(3).standard_normal((4, 2, 3, 32, 32)).astype(np.float32)
    a, b = plain.infer(np.ascontiguousarray(x[:, 0]))[0], plain.infer(np.ascontiguousarray(x[:, 1]))[0]
    assert np.allclose(views.infer(x)[0], (a + b) / 2, atol=1e-5)
    assert not np.allclose(a, b, atol=1e-3)  # the views really differ
    mirror = [plain.infer(np.ascontiguousarray(x[:, k, ..., ::-1]))[0] for k in (0, 1)]
    assert np.allclose(both.infer(x)[0], (a + b + mirror[0] + mirror[1]) / 4, atol=1e-5)


def test_pooled_features_and_the_ood_score_are_the_mean_over_views(tmp_path: Path) -> None:
    m = _views_manifest()
    m.pop("format_version")
    b = load_bundle(make_bundle_v3(tmp_path / "v3", format_version=5, preprocessing=m["preprocessing"]))
    engine = Engine(b)
    x = np.random.default_rng(5).standard_normal((3, 2, 3, 32, 32)).astype(np.float32)
    logits, pooled, _ = engine.infer_features(x)
    singles = [engine.infer_features(np.ascontiguousarray(x[:, k])) for k in (0, 1)]
    assert logits.shape == (3, 7) and pooled.shape == singles[0][1].shape
    assert np.allclose(pooled, (singles[0][1] + singles[1][1]) / 2, atol=1e-5)
    assert np.allclose(logits, (singles[0][0] + singles[1][0]) / 2, atol=1e-5)


def test_the_agent_scans_a_views_bundle_and_stores_the_mean_of_both_views(
        tmp_path: Path, dirs: dict[str, Path], example_images: list[Path]) -> None:
    from conftest import scan_now

    bundle = make_bundle(tmp_path / "b", **_views_manifest())
    for p in example_images[:4]:
        shutil.copy(p, dirs["inbox"])
    code, agent = scan_now(dirs, bundle)
    assert code == 0 and agent.counts.results == 4
    b = load_bundle(bundle)
    one = Preprocessing.from_dict({k: v for k, v in b.preprocessing.to_dict().items() if k != "views"})
    assert stored_p_mel_is_the_bundles(dirs["db"], example_images, b, one)  # two views give other numbers than one
