"""The review app's decoding worker (review/imaging.py): exactly the agent's tensor for a good image, a
sentence for a bad one, and a dead or starved worker costs one image, never the app."""
from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np

from edge_agent.decode import QualityLimits, decode_image
from edge_agent.preprocess import Preprocessing
from edge_agent.review.files import open_inside
from edge_agent.review.imaging import decode_batch


def _open(paths: dict[int, Path], root: Path):
    return [(k, open_inside(str(p), (root,))) for k, p in paths.items()]


def test_tensor_is_the_agents_and_bad_files_get_sentences(tmp_path, example_images) -> None:
    good = tmp_path / "good.jpg"
    good.write_bytes(example_images[0].read_bytes())
    bomb = tmp_path / "bomb.png"
    ok, png = cv2.imencode(".png", np.zeros((40, 40, 3), np.uint8))
    data = bytearray(png.tobytes())
    data[16:24] = (100000).to_bytes(4, "big") * 2
    bomb.write_bytes(bytes(data))
    junk = tmp_path / "junk.jpg"
    junk.write_bytes(b"\xff\xd8\xff\xe0" + os.urandom(3000))
    pre = Preprocessing(input_size=64)
    out = decode_batch(_open({1: good, 2: bomb, 3: junk}, tmp_path), pre)
    want = decode_image(good.read_bytes(), pre, 64_000_000, QualityLimits()).tensor
    assert out[1].tensor is not None and np.array_equal(out[1].tensor, want)
    assert out[1].thumbnail[:2] == b"\xff\xd8" and max(cv2.imdecode(np.frombuffer(out[1].thumbnail, np.uint8),
                                                                    cv2.IMREAD_COLOR).shape[:2]) <= 360
    assert out[2].tensor is None and "megapixels" in out[2].error
    assert out[3].tensor is None and out[3].error


def test_a_starved_worker_costs_one_image_and_the_rest_are_done(tmp_path, example_images) -> None:
    paths = {}
    for i in range(3):
        p = tmp_path / f"{i}.jpg"
        p.write_bytes(example_images[i].read_bytes())
        paths[i] = p
    out = decode_batch(_open(paths, tmp_path), Preprocessing(input_size=64), budget_bytes=1 << 20)
    assert set(out) == {0, 1, 2}
    assert all(d.tensor is None and d.error for d in out.values())  # 1 MiB above start-up: nothing decodes
    out = decode_batch(_open(paths, tmp_path), Preprocessing(input_size=64))
    assert all(d.tensor is not None for d in out.values())
