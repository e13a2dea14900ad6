"""Decode and check: every supported format decodes; every kind of bad file is rejected with a reason."""
from __future__ import annotations

import struct
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest

from edge_agent.decode import (QualityLimits, Rejected, decode_image, decode_pixels, measure_quality, read_header,
                               reduction_for)
from edge_agent.preprocess import Preprocessing
from faults import with_exif_orientation

PRE = Preprocessing(input_size=32)
LIMITS = QualityLimits()
FORMATS = {"jpeg": ".jpg", "png": ".png", "bmp": ".bmp", "tiff": ".tiff", "webp": ".webp"}


@pytest.fixture(scope="module")
def sample(example_images: list[Path]) -> np.ndarray:
    return cv2.imread(str(example_images[0]))


def encode(img: np.ndarray, ext: str) -> bytes:
    ok, buf = cv2.imencode(ext, img)
    assert ok
    return buf.tobytes()


def decode(data: bytes, max_pixels: int = 64_000_000):
    return decode_image(data, PRE, max_pixels, LIMITS)


def rejected(data: bytes, **kw) -> Rejected:
    with pytest.raises(Rejected) as e:
        decode(data, **kw)
    return e.value


@pytest.mark.parametrize("fmt", FORMATS)
def test_each_supported_format_decodes_to_the_model_tensor(sample: np.ndarray, fmt: str) -> None:
    d = decode(encode(sample, FORMATS[fmt]))
    assert d.header.format == fmt
    assert (d.header.width, d.header.height) == (sample.shape[1], sample.shape[0])
    assert d.tensor.shape == (3, 32, 32) and d.tensor.dtype == np.float32
    assert np.isfinite(d.tensor).all()


@pytest.mark.parametrize("fmt", FORMATS)
def test_truncated_files_are_rejected_as_truncated(sample: np.ndarray, fmt: str) -> None:
    data = encode(sample, FORMATS[fmt])
    r = rejected(data[: len(data) * 2 // 3])
    assert r.code == "truncated" and r.maybe_incomplete
    assert "send the image again" in r.reason


def test_header_is_read_without_decoding(sample: np.ndarray) -> None:
    big = cv2.resize(sample, (1000, 750))
    for fmt, ext in FORMATS.items():
        h = read_header(encode(big, ext))
        assert (h.format, h.width, h.height) == (fmt, 1000, 750)


def test_empty_file() -> None:
    r = rejected(b"")
    assert r.code == "empty" and r.maybe_incomplete and "0 bytes" in r.reason


def test_text_named_jpg_is_not_an_image() -> None:
    r = rejected(b"patient notes: lesion on the left forearm\n" * 10)
    assert r.code == "not_image" and "text" in r.reason and "JPEG, PNG" in r.reason


def test_pdf_is_named_as_such() -> None:
    r = rejected(b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n1 0 obj\n<<>>\nendobj\n")
    assert r.code == "not_image" and "PDF" in r.reason


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def test_png_declaring_a_huge_size_is_refused_before_decoding() -> None:
    """A decompression bomb: a few hundred bytes claiming 100000 x 100000 pixels."""
    ihdr = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 1000)
    data = b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")
    r = rejected(data)
    assert r.code == "too_many_pixels" and "100000x100000" in r.reason and "decompression bomb" in r.reason


def test_jpeg_frame_header_above_the_pixel_limit_is_refused(sample: np.ndarray) -> None:
    r = rejected(encode(sample, ".jpg"), max_pixels=10_000)
    assert r.code == "too_many_pixels" and "max_pixels" in r.reason


def test_tiny_image_is_refused(sample: np.ndarray) -> None:
    r = rejected(encode(cv2.resize(sample, (12, 9)), ".png"))
    assert r.code == "too_small"


def test_garbage_after_a_valid_magic_number() -> None:
    r = rejected(b"\x89PNG\r\n\x1a\n" + b"\x00\x00\x00\x0dIHDX" + b"\x00" * 40)
    assert r.code == "corrupt" and "re-export" in r.reason


def test_corrupt_pixel_data_is_rejected_not_crashing(sample: np.ndarray) -> None:
    data = bytearray(encode(sample, ".png"))
    mid = len(data) // 2
    data[mid:mid + 64] = b"\xde\xad\xbe\xef" * 16  # broken zlib stream, CRC mismatch; IEND still present
    r = rejected(bytes(data))
    assert r.code == "corrupt" and "CRC" in r.reason  # every chunk's CRC is checked before decoding (issue 14)


def test_exif_orientation_is_honoured(sample: np.ndarray) -> None:
    landscape = cv2.resize(sample, (200, 100))
    data = with_exif_orientation(encode(landscape, ".jpg"), 6)  # camera held upright: rotate 90 degrees
    h = read_header(data)
    assert (h.width, h.height) == (200, 100)  # stored pixels
    img = decode_pixels(data, h, 1)
    assert img.shape[:2] == (200, 100)  # displayed upright: portrait


def test_large_jpeg_is_decoded_at_reduced_scale(sample: np.ndarray) -> None:
    big = cv2.resize(sample, (2400, 1800))
    data = encode(big, ".jpg")
    h = read_header(data)
    k = reduction_for(h, PRE.input_size)
    assert k in (2, 4, 8)
    assert decode_pixels(data, h, k).shape[:2] == (1800 // k, 2400 // k)
    d = decode(data)
    assert d.reduction == k and d.tensor.shape == (3, 32, 32)


def test_quality_flags(sample: np.ndarray) -> None:
    assert measure_quality(sample, LIMITS).issues == ()
    blurred = cv2.GaussianBlur(sample, (0, 0), 4)
    assert "blurry" in measure_quality(blurred, LIMITS).issues
    dark = (sample * 0.1).astype(np.uint8)
    assert "too_dark" in measure_quality(dark, LIMITS).issues
    bright = np.full_like(sample, 252)
    q = measure_quality(bright, LIMITS)
    assert "overexposed" in q.issues and q.clipped_bright > 0.9


def test_grayscale_and_alpha_images_are_accepted(sample: np.ndarray) -> None:
    gray = cv2.cvtColor(sample, cv2.COLOR_BGR2GRAY)
    rgba = cv2.cvtColor(sample, cv2.COLOR_BGR2BGRA)
    for img in (gray, rgba):
        assert decode(encode(img, ".png")).tensor.shape == (3, 32, 32)


@pytest.mark.parametrize("fmt", FORMATS)
def test_damaged_files_never_raise_anything_but_rejected(sample: np.ndarray, fmt: str) -> None:
    """Cut and corrupted variants of every format: either a clean decode or a Rejected with a reason."""
    data = encode(sample, FORMATS[fmt])
    rng = np.random.default_rng(1)
    variants = [data[:n] for n in sorted({*rng.integers(1, len(data), 25).tolist(), 1, 2, 8, 16, 30, 40})]
    for _ in range(25):
        b = bytearray(data)
        for pos in rng.integers(0, min(len(b), 400), 4):
            b[pos] = int(rng.integers(0, 256))
        variants.append(bytes(b))
    for v in variants:
        try:
            d = decode(v)
        except Rejected as r:
            assert r.code and len(r.reason) > 20
        else:
            assert d.tensor.shape == (3, 32, 32) and np.isfinite(d.tensor).all()
