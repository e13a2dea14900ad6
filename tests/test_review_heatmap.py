"""Heatmaps end to end with the shipped format-3 bundle: the feature output and the classifier head explain
the model's own logits, the case page serves a map for the predicted and the high-risk classes, and every
case where a map would not be honest gets a sentence instead."""
from __future__ import annotations

import os
import sqlite3

import cv2
import numpy as np
import pytest

pytest.importorskip("flask", reason="the review app needs the [review] extra (Flask)")

from conftest import rows  # noqa: E402
from edge_agent.bundle import default_bundle_path, load_bundle  # noqa: E402
from edge_agent.cam import class_activation_map  # noqa: E402
from edge_agent.decode import QualityLimits, decode_image  # noqa: E402
from edge_agent.features import pool  # noqa: E402
from edge_agent.infer import Engine  # noqa: E402
from review_site import HOST, make_site, review_app  # noqa: E402

SHIPPED = default_bundle_path()


@pytest.fixture(scope="module")
def shipped():
    b = load_bundle(SHIPPED)
    if b.head is None:
        pytest.fail(f"the shipped bundle has no classifier head: {b.why_no_heatmap}")
    return b


def test_features_and_head_reproduce_the_logits(shipped, example_images) -> None:
    eng = Engine(shipped)
    eng.load()
    x = np.stack([decode_image(p.read_bytes(), shipped.preprocessing, 64_000_000, QualityLimits()).tensor
                  for p in example_images[:3]])
    maps = eng.feature_maps(x)
    assert maps is not None and maps.ndim == 4 and maps.shape[:2] == (3, shipped.head.feature_dim)
    logits, _ = eng.infer(x)
    from_head = pool(maps) @ shipped.head.weight.T + shipped.head.bias
    np.testing.assert_allclose(from_head, logits, rtol=1e-3, atol=1e-3)  # the CAM decomposes these logits
    k = int(np.argmax(logits[0]))
    cam = class_activation_map(maps[0], shipped.head.weight, shipped.head.bias, k)
    assert cam.shape == maps.shape[2:] and cam.max() == pytest.approx(1.0) and cam.min() >= 0


@pytest.fixture
def site(dirs):
    return make_site(dirs, SHIPPED)


def test_case_page_serves_heatmaps_for_predicted_and_high_risk_classes(site, shipped) -> None:
    client = review_app(site).test_client()
    r = rows(site.db, "SELECT * FROM results ORDER BY needs_review DESC, p_high_risk DESC LIMIT 1")[0]
    page = client.get(f"/case/{r['id']}", headers=HOST).get_data(as_text=True)
    assert 'id="heatmap"' in page and 'id="opacity"' in page
    with open(r["stored_path"], "rb") as f:
        x = decode_image(f.read(), shipped.preprocessing, 64_000_000, QualityLimits()).tensor[None]
    fmap = Engine(shipped).feature_maps(x)[0]
    for label in {r["label"], *shipped.high_risk_labels}:
        assert f'<option value="{label}">' in page
        png = client.get(f"/heatmap/{r['id']}/{label}.png", headers=HOST)
        assert png.status_code == 200 and png.mimetype == "image/png"
        img = cv2.imdecode(np.frombuffer(png.data, np.uint8), cv2.IMREAD_UNCHANGED)
        # Hot where the class has positive evidence, see-through elsewhere; a class with none anywhere on
        # this image (a CAM <= 0 everywhere: it happens for melanoma on a keratosis) is a clear overlay.
        evidence = class_activation_map(fmap, shipped.head.weight, shipped.head.bias, shipped.labels.index(label))
        assert img.shape == (256, 256, 4) and (img[..., 3].max() > 100) == bool(evidence.max() > 0), label
        assert img[..., 3].min() < 50
    assert (class_activation_map(fmap, shipped.head.weight, shipped.head.bias, shipped.labels.index(r["label"]))
            > 0).any()  # the predicted class is hot somewhere, so the map above was not vacuous
    again = client.get(f"/heatmap/{r['id']}/mel.png", headers=HOST)
    assert again.data == client.get(f"/heatmap/{r['id']}/mel.png", headers=HOST).data
    bad = client.get(f"/heatmap/{r['id']}/notalabel.png", headers=HOST)
    assert bad.status_code == 404 and "is not a label of this bundle" in bad.get_data(as_text=True)


def _set(db, rid: int, **cols) -> None:
    conn = sqlite3.connect(db)
    for k, v in cols.items():
        conn.execute(f"UPDATE results SET {k} = ? WHERE id = ?", (v, rid))
    conn.commit()
    conn.close()


def test_no_heatmap_when_it_would_not_be_honest(site) -> None:
    client = review_app(site).test_client()
    # a result produced by another model: a map from this one would explain a different prediction
    _set(site.db, 1, model_id="some-older-model")
    page = client.get("/case/1", headers=HOST).get_data(as_text=True)
    assert "produced by model some-older-model" in page and 'id="heatmap"' not in page
    assert client.get("/heatmap/1/mel.png", headers=HOST).status_code == 404
    # a file in processed/ that is not the image any more (a bomb header): decoded only in the worker, refused
    r2 = rows(site.db, "SELECT stored_path FROM results WHERE id = 2")[0][0]
    ok, png = cv2.imencode(".png", np.zeros((40, 40, 3), np.uint8))
    data = bytearray(png.tobytes())
    data[16:24] = (100000).to_bytes(4, "big") * 2
    with open(r2, "wb") as fh:
        fh.write(bytes(data))
    got = client.get("/heatmap/2/mel.png", headers=HOST)
    assert got.status_code == 404 and "megapixels" in got.get_data(as_text=True)
    # a missing file
    os.unlink(rows(site.db, "SELECT stored_path FROM results WHERE id = 3")[0][0])
    got = client.get("/heatmap/3/mel.png", headers=HOST)
    assert got.status_code == 404 and "moved or pruned" in got.get_data(as_text=True)


def test_static_export_has_a_heatmap_per_case(site, tmp_path) -> None:
    from edge_agent.review.export import export
    from edge_agent.review.db import ensure_schema

    ensure_schema(site.db)
    n = export(site.db, tmp_path / "out", site.dirs["processed"], SHIPPED, limit=50, flagged_only=False)
    assert n == {"cases": 9, "thumbnails": 9, "heatmaps": 9}
    page = (tmp_path / "out" / "index.html").read_text()
    assert page.count("-heat.jpg") == 9
    heat = cv2.imread(str(next((tmp_path / "out" / "img").glob("*-heat.jpg"))))
    thumb = cv2.imread(str(next((tmp_path / "out" / "img").glob("*[0-9].jpg"))))
    assert heat is not None and thumb is not None and heat.shape[2] == 3
