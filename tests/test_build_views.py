"""The build's arithmetic for multi-view bundles is the agent's: the mean over views of each image's logits and
pooled features (stages.run_tta, explain.run_with_features, train.predict_logits), and recipes carry `views`."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from build_model.errors import ConfigError
from build_model.explain import run_with_features
from build_model.recipe import load_recipe
from build_model.stages import run_tta
from build_model.train import predict_logits
from edge_agent.preprocess import Preprocessing
from tests.bundle_factory import FEATURES, conv_classifier

X = np.random.default_rng(0).standard_normal((5, 2, 3, 32, 32)).astype(np.float32)


@pytest.mark.parametrize("tta", ["none", "hflip"])
def test_onnx_logits_and_features_are_the_mean_over_views(tta: str) -> None:
    sess = ort.InferenceSession(conv_classifier(0, 32)[0], providers=["CPUExecutionProvider"])
    views = [np.ascontiguousarray(X[:, k]) for k in (0, 1)]
    assert np.allclose(run_tta(sess, X, tta), (run_tta(sess, views[0], tta) + run_tta(sess, views[1], tta)) / 2,
                       atol=1e-5)
    assert not np.allclose(run_tta(sess, views[0], tta), run_tta(sess, views[1], tta), atol=1e-3)
    lo, fe = run_with_features(sess, X, tta)
    one = [run_with_features(sess, v, tta) for v in views]
    assert np.allclose(lo, (one[0][0] + one[1][0]) / 2, atol=1e-5)
    assert np.allclose(fe, (one[0][1] + one[1][1]) / 2, atol=1e-5) and fe.shape == one[0][1].shape
    assert FEATURES  # the classifier's second output is what run_with_features pools


def test_predict_logits_of_a_torch_model_is_the_mean_over_views() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                                torch.nn.Linear(4, 7))
    pre = Preprocessing(input_size=32, views=("shorter_side_center_crop", "lesion_crop"))
    got = predict_logits(model, X, pre, batch=2)
    one = [predict_logits(model, np.ascontiguousarray(X[:, k]), Preprocessing(input_size=32)) for k in (0, 1)]
    assert got.shape == (5, 7) and np.allclose(got, (one[0] + one[1]) / 2, atol=1e-5)


def _recipe(tmp_path: Path, validate: str) -> Path:
    src = Path(__file__).resolve().parent.parent / "recipes" / "default.toml"
    text = src.read_text().replace('kind = "validate"\ntta = "none"', f'kind = "validate"\ntta = "none"\n{validate}')
    assert validate in text
    p = tmp_path / "r.toml"
    p.write_text(text.replace('base = ".."', f'base = "{src.parent.parent}"'))
    return p


def test_a_recipe_validate_stage_takes_views_and_refuses_a_bad_list(tmp_path: Path) -> None:
    data = tuple(f"{n}={tmp_path / n}" for n in ("ham10000", "isic2017"))  # no ../shared needed
    for spec in data:
        Path(spec.split("=", 1)[1]).mkdir()
    r = load_recipe(_recipe(tmp_path, 'views = ["shorter_side_center_crop", "lesion_crop"]'), data)
    v = next(s for s in r.stages if s.kind == "validate")
    assert v.settings["views"] == ["shorter_side_center_crop", "lesion_crop"]
    for bad in ('views = ["lesion_crop"]', 'views = ["shorter_side_center_crop", "zoom"]', 'views = "lesion_crop"'):
        with pytest.raises(ConfigError, match="views"):
            load_recipe(_recipe(tmp_path, bad), data)
