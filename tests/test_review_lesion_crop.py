"""Heatmaps of a `lesion_crop` bundle lie over the square around the lesion the model saw, not the frame's centre."""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

pytest.importorskip("flask", reason="the review app needs the [review] extra (Flask)")

from bundle_factory import default_manifest, make_bundle_v3  # noqa: E402
from conftest import rows  # noqa: E402
from edge_agent.cam import crop_box, overlay  # noqa: E402
from edge_agent.decode import QualityLimits, decode_image  # noqa: E402
from edge_agent.lesion import lesion_box  # noqa: E402
from edge_agent.preprocess import Preprocessing  # noqa: E402
from edge_agent.review.files import open_inside  # noqa: E402
from edge_agent.review.imaging import decode_batch  # noqa: E402
from review_site import HOST, make_site, review_app  # noqa: E402

PRE = {**default_manifest()["preprocessing"], "resize": "lesion_crop", "lesion_margin": 0.15}


def off_centre_lesion(path: Path) -> tuple[int, int, int, int]:
    """A 400x300 PNG of skin with a dark lesion at the right; returns its lesion box."""
    rng = np.random.default_rng(0)
    img = np.clip(np.full((300, 400, 3), (140, 160, 205), np.float64) + rng.normal(0, 6, (300, 400, 3)), 0, 255)
    img = img.astype(np.uint8)
    cv2.circle(img, (320, 150), 35, (40, 60, 110), -1)
    cv2.imwrite(str(path), img)
    return lesion_box(img, 0.15, "BGR")


def test_the_decoder_reports_the_square_the_model_saw(tmp_path: Path) -> None:
    box = off_centre_lesion(tmp_path / "a.png")
    pre = Preprocessing.from_dict(PRE)
    d = decode_image((tmp_path / "a.png").read_bytes(), pre, 64_000_000, QualityLimits(), want_region=True)
    assert d.region == pytest.approx((box[0] / 400, box[1] / 300, box[2] / 400, box[3] / 300))
    assert d.region[0] > 0.5  # the lesion's square, at the right, not the centre square (0.125 .. 0.875)
    viewed = decode_batch([(0, open_inside(str(tmp_path / "a.png"), (tmp_path,)))], pre, want_thumb=False)[0]
    assert viewed.region == pytest.approx(d.region) and np.array_equal(viewed.tensor, d.tensor)
    plain = decode_image((tmp_path / "a.png").read_bytes(), Preprocessing.from_dict(default_manifest()["preprocessing"]),
                         64_000_000, QualityLimits(), want_region=True)
    assert plain.region is None  # the fixed rules need no region


def test_crop_box_and_overlay_use_the_region() -> None:
    assert crop_box(400, 300, "lesion_crop", (0.6, 0.2, 0.9, 0.6)) == (240, 60, 120, 120)
    assert crop_box(400, 300, "lesion_crop") == crop_box(400, 300)  # no region: the centre square
    photo = np.full((300, 400, 3), 128, np.uint8)
    out = overlay(photo, np.ones((6, 6), np.float32), 0.8, "lesion_crop", (0.6, 0.2, 0.9, 0.6))
    changed = np.argwhere((out != photo).any(axis=2))
    assert changed[:, 1].min() >= 240 and changed[:, 0].min() >= 60 and changed[:, 1].max() < 360


def test_the_case_page_heatmap_is_a_canvas_of_the_photo_with_the_map_on_the_lesion(dirs, tmp_path: Path) -> None:
    bundle = make_bundle_v3(tmp_path / "bundle", format_version=4, preprocessing=PRE)
    box = off_centre_lesion(dirs["inbox"] / "lesion-at-the-right.png")
    site = make_site(dirs, bundle, n=2)
    client = review_app(site).test_client()
    r = rows(site.db, "SELECT id FROM results WHERE original_name = 'lesion-at-the-right.png'")[0]
    page = client.get(f"/case/{r['id']}", headers=HOST).get_data(as_text=True)
    assert 'data-rule="lesion_crop"' in page and 'id="heatmap"' in page
    png = client.get(f"/heatmap/{r['id']}/mel.png", headers=HOST)
    assert png.status_code == 200
    img = cv2.imdecode(np.frombuffer(png.data, np.uint8), cv2.IMREAD_UNCHANGED)
    h, w = img.shape[:2]
    assert img.shape[2] == 4 and w / h == pytest.approx(400 / 300, rel=0.02)  # the photo's shape, placed whole
    seen = np.argwhere(img[..., 3] > 0)
    assert seen.size, "the map shows somewhere"
    sx, sy = w / 400, h / 300
    assert seen[:, 1].min() >= box[0] * sx - 2 and seen[:, 1].max() <= box[2] * sx + 2
    assert seen[:, 0].min() >= box[1] * sy - 2 and seen[:, 0].max() <= box[3] * sy + 2
