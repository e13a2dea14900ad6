"""The preprocessing contract: the fast lookup-table path against the formula written out plainly."""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from edge_agent.preprocess import Preprocessing, preprocess, preprocess_bgr, resize_and_crop, to_tensor

EXAMPLES = sorted((Path(__file__).parent.parent / "examples" / "images").glob("*.jpg"))


def reference(rgb_square: np.ndarray, pre: Preprocessing) -> np.ndarray:
    """Shades-of-Gray then normalisation, pixel by pixel in float64: the definition, not the fast path."""
    img = rgb_square.astype(np.float64)
    if pre.color_constancy == "shades_of_gray":
        p = pre.shades_of_gray_p
        norm = np.mean(img ** p, axis=(0, 1)) ** (1.0 / p)
        img = np.clip(img * (norm.mean() / np.maximum(norm, 1e-6)), 0, 255)
    if pre.color_order == "BGR":
        img = img[..., ::-1]
    img = (img - np.asarray(pre.mean)) / np.asarray(pre.std)
    return img.transpose(2, 0, 1)


@pytest.mark.parametrize("order", ["RGB", "BGR"])
@pytest.mark.parametrize("constancy", ["shades_of_gray", "none"])
def test_lookup_table_path_matches_the_formula(order: str, constancy: str) -> None:
    pre = Preprocessing(input_size=96, color_order=order, color_constancy=constancy, mean=(120.0, 110.0, 100.0),
                        std=(60.0, 50.0, 40.0))
    rng = np.random.default_rng(0)
    images = [cv2.cvtColor(cv2.imread(str(p)), cv2.COLOR_BGR2RGB) for p in EXAMPLES[:4]]
    images.append(rng.integers(0, 256, (120, 90, 3), dtype=np.uint8))
    images.append(np.full((64, 64, 3), (250, 40, 3), np.uint8))  # a strong cast: gains clip at 255
    for rgb in images:
        square = resize_and_crop(rgb, pre.input_size)
        got = to_tensor(square, pre)
        assert got.dtype == np.float32 and got.shape == (3, 96, 96) and got.flags.c_contiguous
        np.testing.assert_allclose(got, reference(square, pre), atol=2e-5)


def test_bgr_entry_point_equals_the_rgb_one() -> None:
    pre = Preprocessing(input_size=192)
    for path in EXAMPLES:
        bgr = cv2.imread(str(path))
        np.testing.assert_array_equal(preprocess_bgr(bgr, pre), preprocess(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB), pre))


def test_non_uint8_input_is_refused_with_a_message() -> None:
    with pytest.raises(ValueError, match="HxWx3 uint8"):
        to_tensor(np.zeros((8, 8, 3), np.float32), Preprocessing(input_size=8))
