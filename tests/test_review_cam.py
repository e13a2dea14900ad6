"""Class activation maps in numpy (edge_agent/cam.py): the arithmetic, its edge cases, the overlay."""
from __future__ import annotations

import numpy as np
import pytest

from edge_agent.cam import CamError, class_activation_map, colorize, crop_box, overlay, png_bytes


def hot_spot_features(c: int = 8, h: int = 7, w: int = 9, at: tuple[int, int] = (2, 6)) -> np.ndarray:
    """Noise everywhere, a strong response on channel 3 at one position."""
    rng = np.random.default_rng(0)
    f = rng.uniform(0, 0.1, (c, h, w)).astype(np.float32)
    f[3, at[0], at[1]] = 5.0
    return f


def test_known_hot_spot_is_the_maximum() -> None:
    f = hot_spot_features()
    weight = np.zeros((4, 8), np.float32)
    weight[1, 3] = 1.0  # class 1 listens to channel 3
    cam = class_activation_map(f, weight, np.zeros(4, np.float32), 1)
    assert cam.shape == (7, 9) and cam.dtype == np.float32
    assert np.unravel_index(np.argmax(cam), cam.shape) == (2, 6)
    assert cam.max() == pytest.approx(1.0) and cam.min() >= 0.0
    assert np.sum(cam > 0.5) == 1  # the noise stays far below the hot spot


def test_equals_the_weighted_sum_relu_normalised() -> None:
    rng = np.random.default_rng(1)
    f = rng.normal(size=(5, 4, 4)).astype(np.float32)
    w = rng.normal(size=(3, 5)).astype(np.float32)
    want = np.maximum(np.einsum("c,chw->hw", w[2], f), 0)
    want = want / want.max()
    np.testing.assert_allclose(class_activation_map(f, w, np.ones(3, np.float32), 2), want, rtol=1e-5, atol=1e-6)


def test_another_class_looks_elsewhere() -> None:
    f = np.zeros((2, 5, 5), np.float32)
    f[0, 0, 0] = 1.0
    f[1, 4, 4] = 1.0
    w = np.eye(2, dtype=np.float32)
    assert np.argmax(class_activation_map(f, w, np.zeros(2), 0)) == 0
    assert np.argmax(class_activation_map(f, w, np.zeros(2), 1)) == 24


def test_flat_and_negative_evidence_give_zeros_not_nan() -> None:
    f = np.ones((3, 4, 4), np.float32)
    assert not class_activation_map(f, -np.ones((2, 3), np.float32), np.zeros(2), 0).any()  # all evidence against
    assert not class_activation_map(np.zeros((3, 4, 4)), np.ones((2, 3)), np.zeros(2), 1).any()  # nothing at all


def test_non_finite_features_count_as_no_evidence() -> None:
    f = hot_spot_features()
    f[0, 0, 0] = np.nan
    f[1, 1, 1] = np.inf
    w = np.zeros((2, 8), np.float32)
    w[0, :] = 1.0
    cam = class_activation_map(f, w, np.zeros(2), 0)
    assert np.isfinite(cam).all() and cam[0, 0] == 0 and cam[1, 1] == 0
    assert np.unravel_index(np.argmax(cam), cam.shape) == (2, 6)


@pytest.mark.parametrize("shape,weight,bias,cls,match", [
    ((4, 3), (2, 4), (2,), 0, "features must be"),
    ((4, 3, 3), (2, 5), (2,), 0, "weight must be"),
    ((4, 3, 3), (2, 4), (3,), 0, "bias must be"),
    ((4, 3, 3), (2, 4), (2,), 2, "out of range"),
    ((4, 3, 3), (2, 4), (2,), -1, "out of range"),
])
def test_mismatched_shapes_are_refused_with_the_shapes(shape, weight, bias, cls, match) -> None:
    with pytest.raises(CamError, match=match):
        class_activation_map(np.zeros(shape), np.zeros(weight), np.zeros(bias), cls)


def test_colorize_is_transparent_where_cold_and_opaque_where_hot() -> None:
    cam = np.zeros((4, 4), np.float32)
    cam[1, 2] = 1.0
    rgba = colorize(cam, (40, 40))
    assert rgba.shape == (40, 40, 4) and rgba.dtype == np.uint8
    assert rgba[0, 0, 3] == 0 and rgba[15, 25, 3] > 150
    assert png_bytes(rgba)[:8] == b"\x89PNG\r\n\x1a\n"


def test_overlay_covers_the_centre_square_the_model_saw() -> None:
    img = np.full((60, 100, 3), 128, np.uint8)  # landscape: the model saw x 20..80
    assert crop_box(100, 60) == (20, 0, 60, 60) and crop_box(100, 60, "stretch") == (0, 0, 100, 60)
    out = overlay(img, np.ones((5, 5), np.float32), alpha=0.6)
    assert out.shape == img.shape
    assert (out[:, :20] == 128).all() and (out[:, 80:] == 128).all()  # outside the crop: untouched
    assert (out[:, 20:80] != 128).any(axis=-1).all()
    assert (overlay(img, np.ones((5, 5)), alpha=0.0) == img).all()  # opacity 0: the photo only
    with pytest.raises(CamError):
        overlay(np.zeros((4, 4), np.uint8), np.ones((2, 2)))
