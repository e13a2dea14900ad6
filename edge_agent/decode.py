"""Decode and check one image file: bytes in, model tensor and quality measures out.

Anything can land in an inbox: empty files from failed copies, half-written
uploads, PDFs renamed to .jpg, hostile PNGs that declare 100000x100000 pixels.
So the format is sniffed from the content (never the name), the dimensions
are read from the header *before* decoding (a decompression bomb is rejected
without allocating it), the container structure is walked before any decoder
follows it (containers.py: chunk lengths, duplicate tags, offsets), truncation
is detected from that structure, the decoded image must have exactly the
header's size, and every rejection carries a reason a person can act on.
OpenCV's own size limits are set to the agent's (runtime_env.py) and the
pipeline runs all of this in a memory-capped worker process (decode_worker.py). Large JPEGs are
decoded at 1/2, 1/4 or 1/8 scale by libjpeg itself, which keeps memory and
time proportional to what the model needs rather than to the camera's sensor.
"""
from __future__ import annotations

import contextlib
import struct
import sys
import threading
from dataclasses import dataclass

import numpy as np

from .containers import MAX_JPEG_FILL, MAX_SEGMENTS, check_structure
from .decoder_messages import StderrCapture, classify
from .lesion import lesion_box
from .preprocess import Preprocessing, preprocess_bgr
from .rejection import Rejected

SUPPORTED = ("jpeg", "png", "bmp", "tiff", "webp")
MIN_SIDE = 32
QUALITY_SIDE = 256
# A reduced JPEG decode must leave about twice the model's input on the short
# side (the area resize that follows then still anti-aliases). 1.9 rather than
# 2.0 lets the common 12 MP frames (4000x3000, 4032x3024) decode at 1/8 for a
# 192-pixel model: 375 px is 1.95x, and the decode costs a third less CPU.
OVERSAMPLE = 1.9
# Only one full-resolution decode of a big non-JPEG image at a time: the
# other formats cannot be decoded at reduced scale, so this caps peak memory.
# The same holds for progressive JPEGs: the decoder keeps every coefficient
# until the last scan, whatever the scale (a 64 MP 4:4:4 one: 427 MB).
BIG_DECODE_PIXELS = 16_000_000
PROGRESSIVE_SOF = {0xC2, 0xC6, 0xCA, 0xCE}
_big_decode = threading.Semaphore(1)

_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


@dataclass(frozen=True)
class Header:
    format: str
    width: int
    height: int
    progressive: bool = False  # a progressive JPEG (SOF2/6/10/14): decoded whole, whatever the scale


@dataclass(frozen=True)
class QualityLimits:
    min_sharpness: float = 10.0
    min_brightness: float = 40.0
    max_brightness: float = 225.0
    max_clipped_fraction: float = 0.25


@dataclass(frozen=True)
class Quality:
    sharpness: float
    brightness: float
    clipped_dark: float
    clipped_bright: float
    issues: tuple[str, ...]

    @property
    def poor(self) -> bool:
        return bool(self.issues)


@dataclass(frozen=True)
class Decoded:
    header: Header
    reduction: int
    tensor: np.ndarray  # 3xSxS float32, exactly the manifest preprocessing
    quality: Quality
    # (x0, y0, x1, y1) as fractions of the image: the square a `lesion_crop` bundle's model saw, when the
    # caller asked (`want_region`: the review app places heatmaps with it); None: the rule's fixed square
    region: tuple[float, float, float, float] | None = None


def sniff(data: bytes) -> str | None:
    """Format from magic bytes, or None. Names lie; content does not."""
    if data[:3] == b"\xff\xd8\xff":
        return "jpeg"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    if data[:2] == b"BM" and len(data) >= 26:
        return "bmp"
    if data[:4] in (b"II*\x00", b"MM\x00*"):
        return "tiff"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    return None


def _describe_unknown(data: bytes) -> str:
    head = data[:16]
    known = {b"%PDF": "a PDF document", b"GIF8": "a GIF image", b"PK\x03\x04": "a ZIP archive (or Office document)",
             b"II+\x00": "a BigTIFF image", b"MM\x00+": "a BigTIFF image", b"\x00\x00\x00\x0cjP": "a JPEG 2000 image",
             b"DICM": "a DICOM file", b"#?RADIANCE": "a Radiance HDR image", b"#?RGBE": "a Radiance HDR image",
             b"PF\n": "a PFM (floating-point) image", b"Pf\n": "a PFM (floating-point) image",
             b"\x59\xa6\x6a\x95": "a Sun raster image", b"\x76\x2f\x31\x01": "an OpenEXR image",
             b"\xff\x0a": "a JPEG XL image", b"\x00\x00\x00\x0cJXL ": "a JPEG XL image",
             b"8BPS": "a Photoshop document",
             b"\xff\x4f\xff\x51": "a JPEG 2000 codestream"}
    for magic, what in known.items():
        if head.startswith(magic) or data[128:132] == magic:
            return what
    if len(head) >= 3 and head[0:1] == b"P" and head[1:2] in b"1234567" and head[2:3] in b" \t\r\n":
        return "a PNM/PPM/PGM image"
    if data[4:12] in (b"ftypheic", b"ftypheix", b"ftypmif1", b"ftypavif"):
        return "a HEIC/AVIF image"
    try:
        data[:512].decode("utf-8")
        return "text"
    except UnicodeDecodeError:
        return f"unknown binary data (starts with {head[:8].hex(' ')})"


def read_header(data: bytes) -> Header:
    """Format and pixel dimensions from the file header, without decoding pixels."""
    if not data:
        raise Rejected("empty", "empty file (0 bytes): the copy probably failed; send the image again", maybe_incomplete=True)
    fmt = sniff(data)
    if fmt is None:
        what = _describe_unknown(data)
        raise Rejected("not_image", f"not a supported image: the content is {what}; supported formats are JPEG, PNG, "
                       "BMP, TIFF and WebP - export the photo in one of those and send it again")
    sof = 0
    try:
        if fmt == "jpeg":
            w, h, sof = jpeg_frame(data)
        else:
            w, h = {"png": _png_size, "bmp": _bmp_size, "tiff": _tiff_size, "webp": _webp_size}[fmt](data)
    except Rejected:
        raise
    except (struct.error, IndexError, ValueError):
        raise Rejected("truncated", f"truncated {fmt.upper()} file: the header ends early; the copy was probably "
                       "interrupted - send the image again", maybe_incomplete=True) from None
    if w <= 0 or h <= 0:
        raise Rejected("corrupt", f"corrupt {fmt.upper()} header: it declares a {w}x{h} image; re-export the image")
    return Header(fmt, w, h, progressive=sof in PROGRESSIVE_SOF)


def jpeg_frame(d: bytes) -> tuple[int, int, int]:
    """The frame header's size and marker (SOF0..SOF15). The walk is bounded (segments, fill bytes): it runs byte
    by byte in Python, and a 100 MB file of empty segments or 0xFF fill bytes would otherwise cost about 10 s of
    CPU."""
    i, n, fill, seen = 2, len(d), 0, 0
    while True:
        while i < n and d[i] == 0xFF and i + 1 < n and d[i + 1] == 0xFF:
            i += 1  # fill bytes
            fill += 1
            if fill > MAX_JPEG_FILL:
                raise Rejected("corrupt", f"corrupt JPEG: more than {MAX_JPEG_FILL} fill bytes (0xFF) between header "
                               "segments; the file is damaged or crafted - re-export the image")
        seen += 1
        if seen > MAX_SEGMENTS:
            raise Rejected("corrupt", f"corrupt JPEG: more than {MAX_SEGMENTS} header segments before the frame "
                           "header; the file is damaged or crafted - re-export the image")
        if i + 4 > n:
            raise IndexError
        if d[i] != 0xFF:
            raise Rejected("corrupt", "corrupt JPEG: invalid marker structure before the image data; re-export the image")
        marker = d[i + 1]
        if marker == 0x01 or 0xD0 <= marker <= 0xD8:
            i += 2
            continue
        if marker in (0xD9, 0xDA):
            raise Rejected("corrupt", "corrupt JPEG: no frame header before the image data; re-export the image")
        seglen = struct.unpack(">H", d[i + 2:i + 4])[0]
        if marker in _SOF:
            h, w = struct.unpack(">HH", d[i + 5:i + 9])
            return w, h, marker
        i += 2 + seglen


def _jpeg_first_sos(d: bytes) -> int:
    """Offset of the first SOS marker, found by walking the segments; -1 if the walk goes astray."""
    i, n, steps = 2, len(d), 0
    while i + 4 <= n:
        steps += 1
        if steps > MAX_SEGMENTS + MAX_JPEG_FILL:
            return -1  # the structure check has refused such a file already; bounded all the same
        if d[i] != 0xFF:
            return -1
        marker = d[i + 1]
        if marker == 0xFF:
            i += 1  # fill byte
            continue
        if marker == 0xDA:
            return i
        if marker == 0x01 or 0xD0 <= marker <= 0xD9:
            return -1  # standalone markers do not belong in the header
        i += 2 + struct.unpack(">H", d[i + 2:i + 4])[0]
    return -1


def _png_size(d: bytes) -> tuple[int, int]:
    if d[12:16] != b"IHDR":
        raise Rejected("corrupt", "corrupt PNG: the first chunk is not IHDR; re-export the image")
    return struct.unpack(">II", d[16:24])


def _bmp_size(d: bytes) -> tuple[int, int]:
    dib = struct.unpack("<I", d[14:18])[0]
    if dib == 12:
        w, h = struct.unpack("<HH", d[18:22])
    else:
        w, h = struct.unpack("<ii", d[18:26])
    return w, abs(h)


def _webp_size(d: bytes) -> tuple[int, int]:
    chunk = d[12:16]
    if chunk == b"VP8 ":
        if d[23:26] != b"\x9d\x01\x2a":
            raise Rejected("corrupt", "corrupt WebP: bad VP8 frame header; re-export the image")
        w, h = struct.unpack("<HH", d[26:30])
        return w & 0x3FFF, h & 0x3FFF
    if chunk == b"VP8L":
        if d[20] != 0x2F:
            raise Rejected("corrupt", "corrupt WebP: bad lossless signature; re-export the image")
        b = struct.unpack("<I", d[21:25])[0]
        return 1 + (b & 0x3FFF), 1 + ((b >> 14) & 0x3FFF)
    if chunk == b"VP8X":
        w = int.from_bytes(d[24:27], "little") + 1
        h = int.from_bytes(d[27:30], "little") + 1
        if len(d) < 30:
            raise IndexError
        return w, h
    raise Rejected("corrupt", f"corrupt WebP: unknown first chunk {chunk!r}; re-export the image")


_TIFF_TYPES = {3: ("H", 2), 4: ("I", 4)}


def _tiff_ifd(d: bytes) -> dict[int, list[int]]:
    e = "<" if d[:2] == b"II" else ">"
    off = struct.unpack(e + "I", d[4:8])[0]
    if off + 2 > len(d):
        raise IndexError
    (count,) = struct.unpack(e + "H", d[off:off + 2])
    tags: dict[int, list[int]] = {}
    for k in range(count):
        p = off + 2 + 12 * k
        tag, typ, n = struct.unpack(e + "HHI", d[p:p + 8])
        if typ not in _TIFF_TYPES or tag not in (256, 257, 273, 279, 324, 325) or n > 1_000_000:
            continue
        code, size = _TIFF_TYPES[typ]
        where = p + 8 if n * size <= 4 else struct.unpack(e + "I", d[p + 8:p + 12])[0]
        if where + n * size > len(d):
            raise IndexError
        tags[tag] = list(struct.unpack(f"{e}{n}{code}", d[where:where + n * size]))
    return tags


def _tiff_size(d: bytes) -> tuple[int, int]:
    tags = _tiff_ifd(d)
    if 256 not in tags or 257 not in tags:
        raise Rejected("corrupt", "corrupt TIFF: no image width/height in the first directory; re-export the image")
    return tags[256][0], tags[257][0]


def check_complete(data: bytes, header: Header) -> None:
    """Reject files whose container says more data should follow (interrupted copies)."""
    fmt, n = header.format, len(data)
    try:
        complete = _complete(data, header)
    except (struct.error, IndexError, ValueError):
        complete = False
    if not complete:
        raise Rejected("truncated", f"truncated {fmt.upper()} file ({n} bytes): the image data ends early; the copy "
                       "was probably interrupted - send the image again", maybe_incomplete=True)


def _complete(data: bytes, header: Header) -> bool:
    fmt, n = header.format, len(data)
    complete = True
    if fmt == "jpeg":
        # The image data must end with EOI. Finding the first scan by walking the header segments (APPn
        # thumbnails skipped whole) is cheap; searching backwards for the last SOS would read the whole
        # entropy-coded data, megabytes for a camera photo, while holding the GIL. 0xFF inside that data is
        # always stuffed, so an EOI after the first scan is the end of the image.
        sos = _jpeg_first_sos(data)
        if sos > 0:
            complete = data.rfind(b"\xff\xd9") > sos
        else:  # unusual marker structure: the plain search, as before
            complete = data.rfind(b"\xff\xd9") > data.rfind(b"\xff\xda") > 0
    elif fmt == "png":
        complete = data.rfind(b"IEND\xaeB`\x82") > 0
    elif fmt == "webp":
        complete = n >= struct.unpack("<I", data[4:8])[0] + 8
    elif fmt == "bmp":
        offbits = struct.unpack("<I", data[10:14])[0]
        if struct.unpack("<I", data[14:18])[0] >= 40:
            bpp, compression = struct.unpack("<HI", data[28:34])
            if compression in (0, 3, 6) and bpp:
                complete = n >= offbits + ((header.width * bpp + 31) // 32) * 4 * header.height
    elif fmt == "tiff":
        tags = _tiff_ifd(data)
        for offs, counts in ((273, 279), (324, 325)):
            if offs in tags and counts in tags:
                complete = complete and max(o + c for o, c in zip(tags[offs], tags[counts], strict=False)) <= n
    return complete


def count_frames(data: bytes, header: Header) -> int:
    """Frames (animated PNG/WebP) or full-size pages (TIFF) in the file; 1 for a still image.

    The decoder would silently return the first one only, and the others would
    never be screened; reduced-resolution TIFF pages (thumbnails) do not count.
    """
    try:
        if header.format == "png":
            pos = 8
            for _ in range(10_000):
                length, kind = struct.unpack(">I4s", data[pos:pos + 8])
                if kind == b"acTL":
                    return max(1, struct.unpack(">I", data[pos + 8:pos + 12])[0])
                if kind in (b"IDAT", b"IEND"):
                    return 1
                pos += 12 + length
        elif header.format == "webp" and data[12:16] == b"VP8X" and data[20] & 0x02:
            frames, pos = 0, 12
            while pos + 8 <= len(data) and frames < 100_000:
                kind, length = data[pos:pos + 4], struct.unpack("<I", data[pos + 4:pos + 8])[0]
                frames += kind == b"ANMF"
                pos += 8 + length + (length & 1)
            return max(frames, 2)  # the animation flag is set: more than a still image, however many
        elif header.format == "tiff":
            e = "<" if data[:2] == b"II" else ">"
            off, pages, seen = struct.unpack(e + "I", data[4:8])[0], 0, set()
            while off and off not in seen and len(seen) < 1000:
                seen.add(off)
                (count,) = struct.unpack(e + "H", data[off:off + 2])
                subfile = 0
                for k in range(count):
                    tag, typ, _n, value = struct.unpack(e + "HHII", data[off + 2 + 12 * k:off + 14 + 12 * k])
                    if tag == 254:  # NewSubfileType: bit 0 marks a reduced-resolution copy
                        subfile = value if typ == 4 else value >> 16 if e == ">" else value & 0xFFFF
                pages += not subfile & 1
                off = struct.unpack(e + "I", data[off + 2 + 12 * count:off + 6 + 12 * count])[0]
            return max(pages, 1)
    except (struct.error, IndexError):
        return 1  # structure problems are the completeness check's and the decoder's to report
    return 1


def reduction_for(header: Header, input_size: int) -> int:
    """Largest libjpeg scale-down that still leaves about twice the model's input size (OVERSAMPLE), and at
    least QUALITY_SIDE, on the short side."""
    if header.format != "jpeg":
        return 1
    short = min(header.width, header.height)
    for k in (8, 4, 2):
        if short // k >= max(OVERSAMPLE * input_size, QUALITY_SIDE):
            return k
    return 1


def decode_pixels(data: bytes, header: Header, reduction: int, capture: StderrCapture | None = None) -> np.ndarray:
    """Decode to an EXIF-oriented 8-bit BGR image (OpenCV applies the orientation tag).

    With `capture` (the decode workers: single-threaded processes), what the decoder prints while decoding is
    read back, and a warning about damaged image data makes the file `corrupt` (decoder_messages.py): libjpeg
    and libpng step over such damage and return an image that is partly garbage.
    """
    import cv2  # in the function: the agent's main process never imports OpenCV (preprocess.py says why)

    flag = {1: cv2.IMREAD_COLOR, 2: cv2.IMREAD_REDUCED_COLOR_2, 4: cv2.IMREAD_REDUCED_COLOR_4,
            8: cv2.IMREAD_REDUCED_COLOR_8}[reduction]
    buf = np.frombuffer(data, np.uint8)
    try:
        with capture if capture is not None else contextlib.nullcontext():
            with _big_decode if is_big(header) else contextlib.nullcontext():
                img = cv2.imdecode(buf, flag)
    except cv2.error as e:
        raise _decoder_error(header, str(e)) from None
    except MemoryError:
        raise _out_of_memory(header) from None
    if capture is not None and capture.text:
        verdict = classify(header.format, capture.text)
        if verdict.notes:
            print(f"edge-agent decoder: {verdict.notes}", file=sys.stderr, flush=True)
        if verdict.damage:
            raise Rejected("corrupt", f"the {header.format.upper()} image data is damaged (the decoder reported: "
                           f"{verdict.damage[:300]}), so part of the decoded picture would be filler or garbage "
                           "and its result meaningless; the file changed after it was written (a failing card or "
                           "an interrupted transfer) - copy or re-export the image from the original again")
    if img is None or img.size == 0:
        raise Rejected("decode_failed", f"the {header.format.upper()} data could not be decoded: the file is damaged "
                       "or uses an unsupported variant; re-export the image as a standard JPEG or PNG")
    if img.ndim == 2:
        img = cv2.cvtColor(img, cv2.COLOR_GRAY2BGR)
    return img


def is_big(header: Header) -> bool:
    """A decode that holds the whole image in memory at full resolution: any format but JPEG, or a progressive
    JPEG, above BIG_DECODE_PIXELS."""
    return header.width * header.height > BIG_DECODE_PIXELS and (header.format != "jpeg" or header.progressive)


def _out_of_memory(header: Header) -> Rejected:
    return Rejected("decode_memory", f"decoding this {header.format.upper()} file needed more memory than the decoder "
                    f"is allowed (it declares {header.width}x{header.height}); the file is damaged or crafted - "
                    "re-export the image, or send a smaller export")


def _decoder_error(header: Header, message: str) -> Rejected:
    """A cv2.error as a rejection: the pixel/size limits and allocation failures get their own codes."""
    last = message.strip().splitlines()[-1] if message.strip() else "no detail"
    if "CV_IO_MAX_IMAGE" in message:
        return Rejected("size_mismatch", f"the {header.format.upper()} decoder found an image larger than the "
                        f"{header.width}x{header.height} its header declares, above the pixel limit: the file is "
                        "damaged or crafted - re-export the image")
    if "Insufficient memory" in message or "Failed to allocate" in message or "bad_alloc" in message:
        return _out_of_memory(header)
    return Rejected("decode_failed", f"the {header.format.upper()} decoder failed ({last}); "
                    "the file is damaged - re-export the image")


def expected_shape(header: Header, reduction: int) -> tuple[int, int]:
    """(width, height) the decoder must return: libjpeg's reduced scales round up."""
    k = reduction
    return -(-header.width // k), -(-header.height // k)


def check_decoded_size(img: np.ndarray, header: Header, reduction: int) -> None:
    """The decoded image must be the header's size (turned by the EXIF orientation, or not): a decoder that
    read other dimensions than the header reader followed a different structure."""
    w, h = expected_shape(header, reduction)
    got = (img.shape[1], img.shape[0])
    if got not in ((w, h), (h, w)):
        raise Rejected("size_mismatch", f"the {header.format.upper()} header declares {header.width}x{header.height} "
                       f"but the decoder produced {got[0]}x{got[1]}"
                       f"{f' at 1/{reduction} scale' if reduction > 1 else ''}: the file is damaged or crafted "
                       "- re-export the image")


def measure_quality(bgr: np.ndarray, limits: QualityLimits) -> Quality:
    """Blur and exposure on the image centre at a fixed scale, so numbers compare across cameras.

    The centre avoids the black vignette of dermoscope optics, which would
    read as clipped shadows and as a sharp edge on every image.
    """
    import cv2

    # Only the centre is measured, so only the centre is converted and resized (a third of the pixels).
    h, w = bgr.shape[:2]
    centre = cv2.cvtColor(bgr[int(h * 0.2):max(int(h * 0.8), int(h * 0.2) + 1),
                              int(w * 0.2):max(int(w * 0.8), int(w * 0.2) + 1)], cv2.COLOR_BGR2GRAY)
    if min(h, w) > QUALITY_SIDE:
        s = QUALITY_SIDE / min(h, w)
        ch, cw = centre.shape
        centre = cv2.resize(centre, (max(1, round(cw * s)), max(1, round(ch * s))), interpolation=cv2.INTER_AREA)
    # 16-bit output holds the 3x3 Laplacian of 8-bit pixels exactly (|value| <= 1020): the variance is the
    # same as from 64-bit floats, with a quarter of the memory traffic.
    sharpness = float(cv2.Laplacian(centre, cv2.CV_16S).var())
    brightness = float(centre.mean())
    dark, bright = float((centre <= 8).mean()), float((centre >= 247).mean())
    issues = []
    if sharpness < limits.min_sharpness:
        issues.append("blurry")
    if brightness < limits.min_brightness or dark > limits.max_clipped_fraction:
        issues.append("too_dark")
    if brightness > limits.max_brightness or bright > limits.max_clipped_fraction:
        issues.append("overexposed")
    return Quality(round(sharpness, 2), round(brightness, 2), round(dark, 4), round(bright, 4), tuple(issues))


def decode_image(data: bytes, pre: Preprocessing, max_pixels: int, limits: QualityLimits,
                 capture: StderrCapture | None = None, want_region: bool = False) -> Decoded:
    """The whole check: header, size limit, completeness, reduced decode (with the decoder's warnings read
    through `capture` where the caller is single-threaded), quality, preprocessing."""
    header = read_header(data)
    if header.width * header.height > max_pixels:
        raise Rejected("too_many_pixels", f"image declares {header.width}x{header.height} = "
                       f"{header.width * header.height / 1e6:.0f} megapixels, above the limit of {max_pixels / 1e6:.0f} "
                       "(possible decompression bomb); it was not decoded - send a smaller export or raise max_pixels")
    if min(header.width, header.height) < MIN_SIDE:
        raise Rejected("too_small", f"image is only {header.width}x{header.height} pixels, too small to screen "
                       f"(needs at least {MIN_SIDE} on each side); send the original photo")
    check_structure(data, header.format)  # before any decoder follows it (containers.py)
    check_complete(data, header)
    frames = count_frames(data, header)
    if frames > 1:
        what = "pages" if header.format == "tiff" else "frames"
        raise Rejected("multiple_images", f"the {header.format.upper()} file holds {frames} {what} (an animation or "
                       "a multi-page document), but only a single still image can be screened - the others would "
                       f"be silently skipped; export each {what[:-1]} you want screened as its own JPEG or PNG")
    k = reduction_for(header, pre.source_size)
    bgr = decode_pixels(data, header, k, capture)
    check_decoded_size(bgr, header, k)
    quality = measure_quality(bgr, limits)
    region = None
    if want_region and pre.resize == "lesion_crop":
        h, w = bgr.shape[:2]
        side = min(h, w)  # no lesion found: the centre square, as preprocess_bgr falls back to
        x0, y0, x1, y1 = lesion_box(bgr, pre.lesion_margin, "BGR") or \
            ((w - side) // 2, (h - side) // 2, (w - side) // 2 + side, (h - side) // 2 + side)
        region = (x0 / w, y0 / h, x1 / w, y1 / h)  # the same square preprocess_bgr cuts
    return Decoded(header, k, preprocess_bgr(bgr, pre), quality, region)
