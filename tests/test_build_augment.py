"""The out-of-source augmentations: shape, dtype, range, and where they may change pixels."""
from __future__ import annotations

import numpy as np
import pytest

from build_model import augment as A

RNG = np.random.default_rng


def photo(h: int = 150, w: int = 200) -> np.ndarray:
    rng = RNG(0)
    img = np.full((h, w, 3), (200, 150, 140), np.uint8)
    return np.clip(img + rng.normal(0, 8, img.shape), 0, 255).astype(np.uint8)


@pytest.mark.parametrize("fn", [A.circular_field, A.vignette, A.hair, A.ruler, A.ink, A.zoom_out, A.squeeze,
                                A.strong_color, A.color_jitter_lut, A.sensor_noise, A.degrade_strong])
def test_each_augmentation_keeps_a_uint8_rgb_image(fn) -> None:
    img = photo()
    out = fn(img, RNG(1))
    assert out.dtype == np.uint8 and out.ndim == 3 and out.shape[2] == 3
    if fn is not A.squeeze:
        assert out.shape == img.shape
    else:
        assert out.shape[0] == img.shape[0]


def test_circular_field_and_vignette_leave_the_centre_intact_and_darken_the_corners() -> None:
    img = photo(192, 192)
    for seed in range(20):
        for fn in (A.circular_field, A.vignette):
            out = fn(img, RNG(seed))
            c = slice(96 - 30, 96 + 30)
            assert np.abs(out[c, c].astype(int) - img[c, c]).max() <= 1, fn.__name__
            if fn is A.vignette:
                assert out[:8, :8].mean() < img[:8, :8].mean() - 5
    small = A.circular_field(img, RNG(0), radius=0.5)
    assert small[:8, :8].max() <= 30 and np.abs(small[96, 96].astype(int) - img[96, 96]).max() <= 1


def test_artefacts_change_pixels_but_only_where_they_are_drawn() -> None:
    img = photo(192, 192)
    ruler = A.ruler(img, RNG(2))
    changed = np.any(ruler != img, axis=2)
    band = changed.any(axis=1).sum(), changed.any(axis=0).sum()
    assert min(band) <= 0.12 * 192 + 1  # one band along one border
    assert np.any(A.hair(img, RNG(3), n=10) != img)
    ink = A.ink(img, RNG(4))
    assert np.any(ink != img) and np.all(ink[80:112, 80:112] == img[80:112, 80:112])  # never on the lesion centre


@pytest.mark.parametrize("names", ["", "artefacts", "zoom", "aspect", "strong_color", "wide_field",
                                   "artefacts,zoom,aspect,strong_color,wide_field"])
def test_augment_v2_gives_the_training_size_whatever_the_families(names: str) -> None:
    cfg = A.AugmentConfig.from_names(names)
    for seed in range(5):
        out = A.augment_v2(photo(), 96, RNG(seed), cfg)
        assert out.shape == (96, 96, 3) and out.dtype == np.uint8
    assert A.augment_v2(photo(), 96, RNG(7), cfg).tobytes() == A.augment_v2(photo(), 96, RNG(7), cfg).tobytes()


def test_unknown_augmentation_name_is_refused_with_the_known_ones() -> None:
    with pytest.raises(ValueError, match="artefacts"):
        A.AugmentConfig.from_names("artefacts,sparkles")


def _dark_disc_area(img: np.ndarray) -> float:
    return float((img[..., 0] < 100).mean())


def test_wide_field_shows_the_lesion_smaller_than_zoom_on_average() -> None:
    """A dark disc filling the middle of a skin-coloured frame covers less of the training image."""
    import cv2
    img = np.full((150, 200, 3), (200, 150, 140), np.uint8)
    cv2.circle(img, (100, 75), 45, (60, 40, 30), -1)
    zoom, wide = A.AugmentConfig.from_names("zoom"), A.AugmentConfig.from_names("wide_field")
    area = {name: np.mean([_dark_disc_area(A.augment_v2(img, 96, RNG(s), cfg)) for s in range(60)])
            for name, cfg in (("zoom", zoom), ("wide", wide))}
    assert area["wide"] < 0.8 * area["zoom"], area
    out = A.zoom_out(img, RNG(0), (0.4, 0.41), fill="skin")  # one lesion, 0.4^2 of its area
    assert out.shape == img.shape and out.dtype == np.uint8
    assert 0.13 < _dark_disc_area(out) / _dark_disc_area(img) < 0.2
    assert _dark_disc_area(out[:, :50]) == 0 and abs(int(out[5, 5, 0]) - 200) < 15  # skin, not a copy
    with pytest.raises(ValueError, match="reflect"):
        A.zoom_out(img, RNG(0), fill="mirror")
