"""The `lesion_crop` resize rule: the square around the lesion, and the centre crop when there is none."""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from edge_agent.lesion import lesion_box, lesion_region
from edge_agent.preprocess import Preprocessing, preprocess, preprocess_bgr, resize_and_crop

EXAMPLES = sorted((Path(__file__).parent.parent / "examples" / "images").glob("*.jpg"))
SKIN = (205, 160, 140)  # RGB


def frame(h: int = 300, w: int = 400, centre: tuple[int, int] = (250, 140), radius: int = 30,
          scope: bool = False) -> np.ndarray:
    """Skin with a brown lesion (and grain, as a camera gives); `scope`: a dermatoscope's black circle around it."""
    rng = np.random.default_rng(0)
    img = np.clip(np.full((h, w, 3), SKIN, np.float64) + rng.normal(0, 6, (h, w, 3)), 0, 255).astype(np.uint8)
    cv2.circle(img, centre, radius, (110, 60, 40), -1)
    if scope:
        field = np.zeros((h, w), np.uint8)
        cv2.circle(field, (w // 2, h // 2), int(0.55 * min(h, w)), 1, -1)
        img[field == 0] = (6, 5, 5)
    return img


def test_the_box_is_a_square_around_an_off_centre_lesion_with_the_margin() -> None:
    img = frame()
    x0, y0, x1, y1 = lesion_box(img, margin=0.15)
    assert x1 - x0 == y1 - y0                                   # square
    assert 0 <= x0 and 0 <= y0 and x1 <= 400 and y1 <= 300      # inside the frame
    assert x0 < 220 and x1 > 280 and y0 < 110 and y1 > 170      # the whole lesion (centre 250,140, radius 30)
    assert 60 <= x1 - x0 <= 60 * 1.3 + 8                        # its diameter plus 15% a side, not the frame
    wide = lesion_box(img, margin=0.5)
    assert wide[2] - wide[0] > x1 - x0                          # a larger margin, a larger square


def test_a_lesion_near_the_edge_gets_a_square_shifted_inside_the_frame() -> None:
    x0, y0, x1, y1 = lesion_box(frame(centre=(50, 150), radius=35), margin=0.5)
    assert x0 == 0 and x1 - x0 == y1 - y0 and x1 > 85


def test_the_dark_field_of_a_dermatoscope_is_not_taken_for_the_lesion() -> None:
    img = frame(centre=(200, 150), radius=20, scope=True)
    x0, y0, x1, y1 = lesion_box(img, margin=0.15)
    assert x1 - x0 < 80 and x0 < 180 and x1 > 220 and y0 < 130 and y1 > 170


@pytest.mark.parametrize("img", [np.full((120, 160, 3), 128, np.uint8),                       # nothing there
                                 np.zeros((6, 6, 3), np.uint8),                               # too small
                                 np.full((100, 100, 3), 4, np.uint8),                         # all dark field
                                 np.zeros((64, 64, 3), np.float32)],                          # not uint8
                         ids=["uniform", "tiny", "black", "float"])
def test_no_plausible_lesion_means_the_centre_crop(img: np.ndarray) -> None:
    box = lesion_box(img)
    side = min(img.shape[:2])
    assert box is None or (box[2] - box[0] == side and box[3] - box[1] == side)
    if img.dtype == np.uint8:
        np.testing.assert_array_equal(resize_and_crop(img, 32, "lesion_crop"), resize_and_crop(img, 32))


def test_bgr_and_rgb_entry_points_crop_the_same_square_on_real_photos() -> None:
    pre = Preprocessing(input_size=96, resize="lesion_crop")
    cropped = 0
    for path in EXAMPLES:
        bgr = cv2.imread(str(path))
        rgb = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
        assert lesion_box(bgr, order="BGR") == lesion_box(rgb)
        np.testing.assert_array_equal(preprocess_bgr(bgr, pre), preprocess(rgb, pre))
        cropped += lesion_region(rgb).shape[:2] != (min(rgb.shape[:2]),) * 2
    assert cropped >= 1  # at least one example lesion is smaller than its frame


def test_the_rule_changes_what_the_model_sees_only_through_the_crop() -> None:
    img = frame()
    pre = Preprocessing(input_size=64, resize="lesion_crop")
    x0, y0, x1, y1 = lesion_box(img, pre.lesion_margin)
    np.testing.assert_array_equal(preprocess(img, pre), preprocess(img[y0:y1, x0:x1].copy(), Preprocessing(input_size=64)))


def test_manifests_of_the_older_rules_are_unchanged_and_the_margin_round_trips() -> None:
    assert "lesion_margin" not in Preprocessing(input_size=192).to_dict()
    d = Preprocessing(input_size=192, resize="lesion_crop", lesion_margin=0.3).to_dict()
    assert d["resize"] == "lesion_crop" and d["lesion_margin"] == 0.3
    assert Preprocessing.from_dict(d).lesion_margin == 0.3
    with pytest.raises(ValueError, match="lesion_margin"):
        Preprocessing.from_dict({**d, "lesion_margin": 5})


def _lesion_manifest(size: int = 32) -> dict:
    from bundle_factory import default_manifest

    m = default_manifest(size)
    m["preprocessing"] = {**m["preprocessing"], "resize": "lesion_crop", "lesion_margin": 0.15}
    return m


def test_a_lesion_crop_bundle_is_format_4_and_older_declarations_are_refused(tmp_path: Path) -> None:
    from bundle_factory import make_bundle

    from edge_agent.bundle import FORMAT_VERSION, required_format_version, verify_bundle

    assert FORMAT_VERSION >= 4 and required_format_version(_lesion_manifest()) == 4
    rep = verify_bundle(make_bundle(tmp_path / "v3", **{**_lesion_manifest(), "format_version": 3}))
    assert not rep.ok and any("lesion_crop" in e and "format version 4" in e for e in rep.errors)
    rep = verify_bundle(make_bundle(tmp_path / "odd", **{**_lesion_manifest(), "format_version": 4,
                                                          "preprocessing": {**_lesion_manifest()["preprocessing"],
                                                                            "lesion_margin": "wide"}}))
    assert not rep.ok and any("lesion_margin" in e for e in rep.errors)


def test_the_agent_scans_with_a_lesion_crop_bundle_and_its_numbers_are_the_cropped_images(
        tmp_path: Path, dirs: dict[str, Path], example_images: list[Path]) -> None:
    import shutil

    from bundle_factory import make_bundle
    from conftest import scan_now

    from edge_agent.bundle import load_bundle

    bundle = make_bundle(tmp_path / "b", **{**_lesion_manifest(), "format_version": 4})
    for p in example_images[:4]:
        shutil.copy(p, dirs["inbox"])
    code, agent = scan_now(dirs, bundle)
    assert code == 0 and agent.counts.results == 4
    b = load_bundle(bundle)
    assert b.preprocessing.resize == "lesion_crop"
    centre = Preprocessing.from_dict({**b.preprocessing.to_dict(), "resize": "shorter_side_center_crop"})
    assert stored_p_mel_is_the_bundles(dirs["db"], example_images, b, centre)  # the crop changed what the model saw


def stored_p_mel_is_the_bundles(db: Path, example_images: list[Path], b, other: Preprocessing) -> int:
    """Asserts each stored p_mel is the bundle's own preprocessing and model on the file; returns how many differ
    from what `other` preprocessing would give (a test that cannot tell the two apart proves nothing)."""
    from conftest import rows

    from edge_agent.infer import Engine

    engine = Engine(b)

    def p_mel(x: np.ndarray) -> float:
        z = engine.infer(x[None])[0][0] / b.temperature
        return float((np.exp(z - z.max()) / np.exp(z - z.max()).sum())[b.labels.index("mel")])

    differs = 0
    for r in rows(db, "SELECT original_name, p_mel FROM results"):
        bgr = cv2.imread(str(next(p for p in example_images if p.name == r["original_name"])))
        assert r["p_mel"] == pytest.approx(p_mel(preprocess_bgr(bgr, b.preprocessing)), abs=1e-4)
        differs += abs(r["p_mel"] - p_mel(preprocess_bgr(bgr, other))) > 1e-4
    return differs


def test_large_photos_are_decoded_finer_for_a_lesion_crop() -> None:
    from edge_agent.decode import QualityLimits, decode_image

    big = cv2.resize(frame(), (3200, 2400), interpolation=cv2.INTER_LINEAR)
    data = cv2.imencode(".jpg", big)[1].tobytes()
    plain = decode_image(data, Preprocessing(input_size=192), 64_000_000, QualityLimits())
    crop = decode_image(data, Preprocessing(input_size=192, resize="lesion_crop"), 64_000_000, QualityLimits())
    assert plain.reduction == 4 and crop.reduction == 2  # the lesion square (a fifth of the side) from real pixels
