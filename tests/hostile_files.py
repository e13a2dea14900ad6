"""Crafted image files for the red-team of the decoding path (issue 16 item 1, siblings).

Each builder returns the bytes of one hostile (or merely unusual) file, made
here from the format's specification so the tests need no binary fixtures.
`ATTACKS` lists them all with a short description; `scripts/file_attacks.py`
runs every one through a real `edge-agent scan` under RLIMIT_AS and prints
outcome, peak RSS (VmHWM) and CPU time, and tests/test_harden_files_siblings.py
pins the outcomes that matter.
"""
from __future__ import annotations

import io
import struct
import zlib
from collections.abc import Callable

import numpy as np

# --- helpers ---------------------------------------------------------------------------------------


def _cv2():
    import cv2

    return cv2


def png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)


PNG_SIG = b"\x89PNG\r\n\x1a\n"
_ADAM7 = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2))


def _zeros_deflate(rows: list[int]) -> bytes:
    """zlib stream of len(rows) filtered rows (filter byte 0 + n zero bytes each), without building them all."""
    z = zlib.compressobj(9)
    out = []
    for n in rows:
        out.append(z.compress(b"\x00" * (n + 1)))
    out.append(z.flush())
    return b"".join(out)


def png_zeros(w: int, h: int, depth: int = 8, colour: int = 2, interlace: int = 0, extra: bytes = b"",
              before_idat: bytes = b"", after_idat: bytes = b"") -> bytes:
    """A valid PNG of w x h zero pixels (a zlib bomb: ~1000:1), any depth/colour type, Adam7 or not."""
    channels = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}[colour]
    bpp_bits = depth * channels

    def rowbytes(width: int) -> int:
        return (width * bpp_bits + 7) // 8

    if interlace:
        rows = []
        for x0, y0, dx, dy in _ADAM7:
            pw, ph = max(0, (w - x0 + dx - 1) // dx), max(0, (h - y0 + dy - 1) // dy)
            if pw and ph:
                rows += [rowbytes(pw)] * ph
    else:
        rows = [rowbytes(w)] * h
    ihdr = struct.pack(">IIBBBBB", w, h, depth, colour, 0, 0, interlace)
    plte = png_chunk(b"PLTE", bytes(3 * 2 ** min(depth, 8))) if colour == 3 else b""
    return (PNG_SIG + png_chunk(b"IHDR", ihdr) + extra + plte + before_idat
            + png_chunk(b"IDAT", _zeros_deflate(rows)) + after_idat + png_chunk(b"IEND", b""))


def _encode(ext: str, img: np.ndarray, params: list[int] | None = None) -> bytes:
    ok, buf = _cv2().imencode(ext, img, params or [])
    assert ok, ext
    return buf.tobytes()


def noise(h: int = 96, w: int = 128, seed: int = 7) -> np.ndarray:
    rng = np.random.default_rng(seed)
    base = np.linspace(40, 200, w, dtype=np.float32)[None, :, None] + rng.normal(0, 20, (h, w, 3))
    return np.clip(base, 0, 255).astype(np.uint8)


# --- JPEG --------------------------------------------------------------------------------------------

class _Bits:
    def __init__(self) -> None:
        self.out, self.acc, self.n = bytearray(), 0, 0

    def put(self, v: int, n: int) -> None:
        for i in range(n - 1, -1, -1):
            self.acc = (self.acc << 1) | ((v >> i) & 1)
            self.n += 1
            if self.n == 8:
                self.out.append(self.acc)
                if self.acc == 0xFF:
                    self.out.append(0)  # byte stuffing
                self.acc, self.n = 0, 0

    def flush(self) -> bytes:
        if self.n:
            self.put((1 << (8 - self.n)) - 1, 8 - self.n)
        return bytes(self.out)


def jpeg_segment(marker: int, body: bytes) -> bytes:
    return b"\xff" + bytes([marker]) + struct.pack(">H", len(body) + 2) + body


def _eob_run_scan(blocks: int) -> bytes:
    """Entropy data of an AC scan that skips `blocks` blocks with end-of-band runs (a few bytes for 1M blocks)."""
    b = _Bits()
    while blocks:
        run = min(blocks, 32767)
        blocks -= run
        r = run.bit_length() - 1
        b.put(r, 4)  # the AC table below gives symbol r<<4 (EOBr) the 4-bit code r
        if r:
            b.put(run - (1 << r), r)
    return b.flush()


def progressive_jpeg(w: int, h: int, scans: list[tuple[int, int, int, int]], precision: int = 8,
                     sof: int = 0xC2) -> bytes:
    """A grey progressive JPEG: one DC scan, then the AC scans (Ss, Se, Ah, Al), each skipping every block
    with end-of-band runs. The decoder still visits every block once per scan: the work is scans x blocks
    for a file of a few hundred bytes per scan."""
    blocks = ((w + 7) // 8) * ((h + 7) // 8)
    out = b"\xff\xd8" + jpeg_segment(0xDB, b"\x00" + b"\x01" * 64)
    out += jpeg_segment(sof, struct.pack(">BHHB", precision, h, w, 1) + b"\x01\x11\x00")
    out += jpeg_segment(0xC4, b"\x00" + bytes([1] + [0] * 15) + b"\x00")
    out += jpeg_segment(0xC4, b"\x10" + bytes([0, 0, 0, 15] + [0] * 12) + bytes(r << 4 for r in range(15)))
    out += jpeg_segment(0xDA, b"\x01\x01\x00\x00\x00\x00") + bytes(-(-blocks // 8))
    ac = _eob_run_scan(blocks)
    for ss, se, ah, al in scans:
        out += jpeg_segment(0xDA, b"\x01\x01\x00" + bytes([ss, se, (ah << 4) | al])) + ac
    return out + b"\xff\xd9"


def valid_successive_scans() -> list[tuple[int, int, int, int]]:
    """The longest valid progression of one component: each AC coefficient alone, first at Al=13, then
    refined bit by bit: 63 x 14 = 882 scans, every one legal."""
    s = []
    for k in range(1, 64):
        s.append((k, k, 0, 13))
        s += [(k, k, al + 1, al) for al in range(12, -1, -1)]
    return s


def jpeg_many_scans_valid(side: int = 8000) -> bytes:
    return progressive_jpeg(side, side, valid_successive_scans())


def jpeg_many_scans_repeated(side: int = 8000, n: int = 3000) -> bytes:
    return progressive_jpeg(side, side, [(1, 63, 0, 0)] * n)


def jpeg_sane_progressive(side: int = 2000) -> bytes:
    """What an encoder writes: libjpeg's default progression for grey (DC, then 5 AC scans)."""
    return progressive_jpeg(side, side, [(1, 5, 0, 2), (6, 63, 0, 2), (1, 63, 2, 1), (1, 63, 1, 0)])


def jpeg_with_app1(payload: bytes, img: np.ndarray | None = None) -> bytes:
    j = _encode(".jpg", noise() if img is None else img)
    return j[:2] + jpeg_segment(0xE1, payload) + j[2:]


def exif(entries: list[tuple[int, int, int, bytes]], next_ifd: int = 0, extra: bytes = b"") -> bytes:
    """Exif APP1 payload, little-endian, IFD0 at 8 with (tag, type, count, 4-byte value/offset)."""
    ifd = struct.pack("<H", len(entries)) + b"".join(struct.pack("<HHI", t, ty, c) + v.ljust(4, b"\0")
                                                      for t, ty, c, v in entries) + struct.pack("<I", next_ifd)
    return b"Exif\x00\x00" + b"II*\x00" + struct.pack("<I", 8) + ifd + extra


def jpeg_exif_orientation(value: int) -> bytes:
    return jpeg_with_app1(exif([(0x0112, 3, 1, struct.pack("<H", value))]))


def jpeg_exif_ifd_loop() -> bytes:
    """IFD0's next-IFD offset points at IFD0 itself, and its EXIF pointer at IFD0 too."""
    return jpeg_with_app1(exif([(0x0112, 3, 1, struct.pack("<H", 6)), (0x8769, 4, 1, struct.pack("<I", 8))],
                               next_ifd=8))


def jpeg_exif_huge_counts() -> bytes:
    """Entries whose counts claim gigabytes (ASCII make, rational arrays) in a 100-byte EXIF."""
    return jpeg_with_app1(exif([(0x010F, 2, 0xFFFFFFF0, struct.pack("<I", 8)), (0x0112, 3, 0x7FFFFFFF, b"\x01\0"),
                                (0x011A, 5, 0x20000000, struct.pack("<I", 8))]))


def jpeg_many_app_segments(n: int = 500) -> bytes:
    """n 64 KB APP segments: 500 is 33 MB of metadata before the image (n=1500, 98 MB, just under max_file_mb,
    measured alone with scripts/file_attacks.py: agent 284 MB, worker 238 MB peak RSS, a result)."""
    j = _encode(".jpg", noise())
    seg = jpeg_segment(0xE2, b"X" * 65_000)
    return j[:2] + seg * n + j[2:]


def jpeg_restart_abuse() -> bytes:
    """DRI of 1 MCU but no RST markers in the data: the decoder must resynchronise at every MCU."""
    j = _encode(".jpg", noise(1024, 1024))
    return j[:2] + jpeg_segment(0xDD, struct.pack(">H", 1)) + j[2:]


def jpeg_many_dht(n: int = 90_000) -> bytes:
    j = _encode(".jpg", noise())
    dht = jpeg_segment(0xC4, b"\x00" + bytes([1] + [0] * 15) + b"\x00")
    return j[:2] + dht * n + j[2:]


def jpeg_arithmetic_garbage(side: int = 4000) -> bytes:
    """SOF10 (progressive, arithmetic coding) with 2000 scans of random bytes."""
    rng = np.random.default_rng(3)
    blk = bytes(rng.integers(0, 255, 64, dtype=np.uint8)).replace(b"\xff", b"\x00")
    out = b"\xff\xd8" + jpeg_segment(0xDB, b"\x00" + b"\x01" * 64)
    out += jpeg_segment(0xCA, struct.pack(">BHHB", 8, side, side, 1) + b"\x01\x11\x00")
    out += jpeg_segment(0xDA, b"\x01\x01\x00\x00\x00\x00") + blk
    for _ in range(2000):
        out += jpeg_segment(0xDA, b"\x01\x01\x00\x01\x3f\x00") + blk
    return out + b"\xff\xd9"


def jpeg_12bit(side: int = 512) -> bytes:
    return progressive_jpeg(side, side, [(1, 63, 0, 0)], precision=12)


def jpeg_cmyk() -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(noise()).convert("CMYK").save(buf, "JPEG", quality=90)
    return buf.getvalue()


def jpeg_with_big_mpf_trailer() -> bytes:
    """A normal JPEG followed (after EOI) by a second, 60000x60000 'image' as phones append for depth maps."""
    return _encode(".jpg", noise()) + progressive_jpeg(60_000, 60_000, [(1, 63, 0, 0)] * 5)


# --- PNG ---------------------------------------------------------------------------------------------

def png_bomb_rgba16_adam7() -> bytes:
    return png_zeros(8000, 8000, 16, 6, interlace=1)


def png_bomb_rgba16() -> bytes:
    return png_zeros(8000, 8000, 16, 6)


def png_bomb_palette1() -> bytes:
    return png_zeros(8000, 8000, 1, 3)


def png_bomb_grey_alpha16_adam7() -> bytes:
    return png_zeros(8000, 8000, 16, 4, interlace=1)


def png_many_text_chunks(n: int = 99_000) -> bytes:
    return png_zeros(64, 64, before_idat=png_chunk(b"tEXt", b"k\x00v") * n)


def png_too_many_chunks() -> bytes:
    return png_many_text_chunks(110_000)


def png_ztxt_bombs(n: int = 1200) -> bytes:
    """n zTXt chunks, each 8 MB of zeros compressed to ~8 KB: libpng inflates text chunks while reading."""
    body = b"k\x00\x00" + zlib.compress(b"\x00" * (8 << 20), 9)
    return png_zeros(64, 64, before_idat=png_chunk(b"zTXt", body) * n)


def png_iccp_bomb() -> bytes:
    body = b"icc\x00\x00" + zlib.compress(b"\x00" * (512 << 20), 9)
    return png_zeros(64, 64, extra=png_chunk(b"iCCP", body))


def png_exif_loop() -> bytes:
    return png_zeros(64, 64, before_idat=png_chunk(b"eXIf", exif(
        [(0x0112, 3, 1, struct.pack("<H", 6)), (0x8769, 4, 1, struct.pack("<I", 8))], next_ifd=8)[6:]))


def png_exif_orientation_rotates() -> bytes:
    """64x48 with EXIF orientation 6: OpenCV 5 turns it; the size check accepts the turned size."""
    return png_zeros(64, 48, before_idat=png_chunk(b"eXIf", exif([(0x0112, 3, 1, struct.pack("<H", 6))])[6:]))


def _actl(frames: int) -> bytes:
    return png_chunk(b"acTL", struct.pack(">II", frames, 0))


def _fctl(seq: int, w: int, h: int, x: int = 0, y: int = 0) -> bytes:
    return png_chunk(b"fcTL", struct.pack(">IIIIIHHBB", seq, w, h, x, y, 1, 10, 0, 0))


def apng_frame_larger_than_canvas() -> bytes:
    """acTL says 1 frame; its fcTL says 60000x60000 at a 64x64 canvas."""
    return png_zeros(64, 64, before_idat=_actl(1) + _fctl(0, 60_000, 60_000))


def apng_second_frame_huge() -> bytes:
    """A 2-frame APNG whose second frame is 8000x8000 of zeros in fdAT."""
    data = _zeros_deflate([8000 * 3] * 8000)
    fdat = png_chunk(b"fdAT", struct.pack(">I", 2) + data)
    return png_zeros(64, 64, before_idat=_actl(2) + _fctl(0, 64, 64), after_idat=_fctl(1, 8000, 8000) + fdat)


def apng_actl_zero_frames() -> bytes:
    return png_zeros(64, 64, before_idat=_actl(0) + _fctl(0, 64, 64),
                     after_idat=_fctl(1, 64, 64) + png_chunk(b"fdAT", struct.pack(">I", 2) + _zeros_deflate([192] * 64)))


def apng_actl_after_idat() -> bytes:
    """acTL after the image data (invalid): a reader that looks for it only before IDAT sees a still image."""
    return png_zeros(64, 64, after_idat=_actl(3) + _fctl(1, 64, 64)
                     + png_chunk(b"fdAT", struct.pack(">I", 2) + _zeros_deflate([192] * 64)))


def png_extreme_aspect(w: int, h: int) -> bytes:
    img = np.random.default_rng(1).integers(0, 255, (h, w, 3), dtype=np.uint8)
    return _encode(".png", img)


def png_flat(value: int) -> bytes:
    return _encode(".png", np.full((256, 256, 3), value, np.uint8))


def png_with_alpha() -> bytes:
    img = np.dstack([noise(), np.full((96, 128), 0, np.uint8)])  # fully transparent
    return _encode(".png", img)


def png_with_jpeg_appended() -> bytes:
    return _encode(".png", noise()) + _encode(".jpg", noise())


# --- TIFF --------------------------------------------------------------------------------------------

def tiff_ifd(entries: list[tuple[int, int, int, int | bytes]], blobs: list[bytes], be: bool = False) -> bytes:
    """A TIFF with one IFD at 8; `blobs` follow the IFD; an int value -(k+1) is replaced by blob k's offset,
    a bytes value is stored out of line (after the blobs) and its offset written."""
    e = ">" if be else "<"
    entries = sorted(entries, key=lambda x: x[0])
    ifd_size = 2 + 12 * len(entries) + 4
    at = 8 + ifd_size
    offsets = []
    for b in blobs:
        offsets.append(at)
        at += len(b) + (len(b) & 1)
    tail = b""
    out = (b"MM\x00*" if be else b"II*\x00") + struct.pack(e + "I", 8) + struct.pack(e + "H", len(entries))
    for tag, typ, count, value in entries:
        if isinstance(value, bytes):
            packed = struct.pack(e + "I", at + len(tail))
            tail += value + b"\0" * (len(value) & 1)
        else:
            v = offsets[-value - 1] if value < 0 else value
            packed = (struct.pack(e + "H", v) + b"\0\0") if typ == 3 else struct.pack(e + "I", v)
        out += struct.pack(e + "HHI", tag, typ, count) + packed
    out += struct.pack(e + "I", 0)
    for b in blobs:
        out += b + b"\0" * (len(b) & 1)
    return out + tail


def _tiff_base(w: int, h: int, spp: int = 1, bits: int = 8, photometric: int = 1) -> list:
    bps = (258, 3, 1, bits) if spp == 1 else (258, 3, spp, struct.pack("<" + "H" * spp, *[bits] * spp))
    return [(256, 4, 1, w), (257, 4, 1, h), bps, (262, 3, 1, photometric), (277, 3, 1, spp)]


def tiff_huge_tiles() -> bytes:
    """64x64 image with 65536x65536 tiles (a 4 GB tile buffer per tile)."""
    tile = zlib.compress(b"\x00" * 64)
    return tiff_ifd(_tiff_base(64, 64) + [(259, 3, 1, 8), (322, 4, 1, 65536), (323, 4, 1, 65536),
                                          (324, 4, 1, -1), (325, 4, 1, len(tile))], [tile])


def tiff_deflate_bomb(side: int = 8000, tiled: bool = False) -> bytes:
    z = zlib.compressobj(9)
    row = b"\x00" * side
    data = b"".join(z.compress(row) for _ in range(side)) + z.flush()
    if tiled:
        return tiff_ifd(_tiff_base(side, side) + [(259, 3, 1, 8), (322, 4, 1, side), (323, 4, 1, side),
                                                  (324, 4, 1, -1), (325, 4, 1, len(data))], [data])
    return tiff_ifd(_tiff_base(side, side) + [(259, 3, 1, 8), (273, 4, 1, -1), (278, 4, 1, side),
                                              (279, 4, 1, len(data))], [data])


def tiff_pil(compression: str, side: int = 8000, mode: str = "L") -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new(mode, (side, side), 0).save(buf, "TIFF", compression=compression)
    return buf.getvalue()


def tiff_wide_float_samples(side: int = 8000) -> bytes:
    """8 samples of 32-bit float per pixel at 64 MP: 2 GB decoded, one deflate strip of zeros."""
    z = zlib.compressobj(9)
    row = b"\x00" * (side * 32)
    data = b"".join(z.compress(row) for _ in range(side)) + z.flush()
    return tiff_ifd(_tiff_base(side, side, spp=8, bits=32, photometric=1)
                    + [(259, 3, 1, 8), (273, 4, 1, -1), (278, 4, 1, side), (279, 4, 1, len(data)),
                       (339, 3, 8, struct.pack("<8H", *[3] * 8))], [data])


def tiff_float_nan(side: int = 64) -> bytes:
    data = np.full((side, side), np.nan, "<f4").tobytes()
    return tiff_ifd(_tiff_base(side, side, bits=32) + [(259, 3, 1, 1), (273, 4, 1, -1), (278, 4, 1, side),
                                                      (279, 4, 1, len(data)), (339, 3, 1, 3)], [data])


def tiff_planar(side: int = 64) -> bytes:
    planes = [bytes([v]) * side * side for v in (30, 120, 220)]
    e = _tiff_base(side, side, spp=3, photometric=2) + [(259, 3, 1, 1), (278, 4, 1, side), (284, 3, 1, 2)]
    blob = b"".join(planes)
    d = tiff_ifd(e + [(273, 4, 3, b"\0" * 12), (279, 4, 3, struct.pack("<3I", *[side * side] * 3))], [blob])
    # fix the strip offsets (stored out of line) to point into the blob, which starts right after the IFD
    ifd_end = 8 + 2 + 12 * (len(e) + 2) + 4
    at = ifd_end + len(blob) + 6  # the out-of-line values follow the blob in tag order: BitsPerSample (6 bytes) first
    return d[:at] + struct.pack("<3I", ifd_end, ifd_end + side * side, ifd_end + 2 * side * side) + d[at + 12:]


def tiff_palette(side: int = 64) -> bytes:
    cmap = struct.pack("<768H", *([0] * 256 + list(range(0, 65536, 256)) + [65535] * 256))
    data = bytes(range(256)) * (side * side // 256)
    return tiff_ifd(_tiff_base(side, side, photometric=3) + [(259, 3, 1, 1), (273, 4, 1, -1), (278, 4, 1, side),
                                                            (279, 4, 1, len(data)), (320, 3, 768, cmap)], [data])


def tiff_second_page_huge_reduced() -> bytes:
    """Page 1 is 64x64; page 2, flagged as a reduced-resolution copy, claims 60000x60000."""
    first = tiff_ifd(_tiff_base(64, 64) + [(259, 3, 1, 1), (273, 4, 1, -1), (278, 4, 1, 64), (279, 4, 1, 4096)],
                     [b"\x80" * 4096])
    # append a second IFD and link it from the first IFD's next pointer
    strip = zlib.compress(b"\x00" * 1000)
    second_at = len(first) + (len(first) & 1)
    first = first + b"\0" * (len(first) & 1)
    entries = sorted(_tiff_base(60_000, 60_000) + [(254, 4, 1, 1), (259, 3, 1, 8), (273, 4, 1, 0),
                                                     (278, 4, 1, 60_000), (279, 4, 1, len(strip))])
    ifd = struct.pack("<H", len(entries))
    strip_at = second_at + 2 + 12 * len(entries) + 4
    for tag, typ, count, value in entries:
        v = strip_at if tag == 273 else value
        packed = (struct.pack("<H", v) + b"\0\0") if typ == 3 else struct.pack("<I", v)
        ifd += struct.pack("<HHI", tag, typ, count) + packed
    ifd += struct.pack("<I", 0) + strip
    n = struct.unpack("<H", first[8:10])[0]
    nxt = 8 + 2 + 12 * n
    return first[:nxt] + struct.pack("<I", second_at) + first[nxt + 4:] + ifd


def tiff_jpeg_progressive_strip(side: int = 8000, scans: int = 3000) -> bytes:
    """Compression 7 (JPEG-in-TIFF) whose one strip is a progressive JPEG with `scans` scans."""
    strip = jpeg_many_scans_repeated(side, scans)
    return tiff_ifd(_tiff_base(side, side) + [(259, 3, 1, 7), (273, 4, 1, -1), (278, 4, 1, side),
                                              (279, 4, 1, len(strip))], [strip])


def tiff_ojpeg_progressive(side: int = 8000, scans: int = 3000) -> bytes:
    """Compression 6 (old-style JPEG) pointing at a progressive JPEG with `scans` scans."""
    strip = jpeg_many_scans_repeated(side, scans)
    return tiff_ifd(_tiff_base(side, side) + [(259, 3, 1, 6), (273, 4, 1, -1), (278, 4, 1, side),
                                              (279, 4, 1, len(strip)), (513, 4, 1, -1), (514, 4, 1, len(strip))],
                    [strip])


# --- WebP / BMP --------------------------------------------------------------------------------------

def webp_lossless_big() -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (8000, 8000), 0).save(buf, "WEBP", lossless=True, method=0)
    return buf.getvalue()


def webp_animated() -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    frames = [Image.fromarray(noise(seed=s)) for s in range(3)]
    frames[0].save(buf, "WEBP", save_all=True, append_images=frames[1:], duration=100)
    return buf.getvalue()


def webp_anim_flag_cleared() -> bytes:
    """An animated WebP whose VP8X animation flag was cleared: ANMF chunks but no VP8/VP8L."""
    d = bytearray(webp_animated())
    d[20] &= ~0x02
    return bytes(d)


def bmp_rle8_bomb(side: int = 8000) -> bytes:
    """8000x8000 RLE8 that ends at once (end-of-bitmap): a 1 KB file for 64 MP."""
    pixels = b"\x00\x01"
    pal = bytes(1024)
    off = 14 + 40 + len(pal)
    hdr = struct.pack("<IiiHHIIiiII", 40, side, side, 1, 8, 1, len(pixels), 2835, 2835, 256, 0)
    return b"BM" + struct.pack("<IHHI", off + len(pixels), 0, 0, off) + hdr + pal + pixels


def bmp_rle4_topdown() -> bytes:
    """RLE4 with a negative (top-down) height, which the format forbids for RLE."""
    pixels = b"\x40\x12" * 16 + b"\x00\x00" + b"\x40\x12" * 16 + b"\x00\x01"
    pal = bytes(64)
    off = 14 + 40 + len(pal)
    hdr = struct.pack("<IiiHHIIiiII", 40, 64, -64, 1, 4, 2, len(pixels), 2835, 2835, 16, 0)
    return b"BM" + struct.pack("<IHHI", off + len(pixels), 0, 0, off) + hdr + pal + pixels


def bmp_topdown() -> bytes:
    w, h = 64, 48
    pixels = noise(h, w).tobytes()
    hdr = struct.pack("<IiiHHIIiiII", 40, w, -h, 1, 24, 0, len(pixels), 2835, 2835, 0, 0)
    return b"BM" + struct.pack("<IHHI", 54 + len(pixels), 0, 0, 54) + hdr + pixels


def bmp_bitfields(bpp: int, masks: tuple[int, int, int] | None = None, v4: bool = False,
                  pixels: bytes | None = None, w: int = 64, h: int = 48) -> bytes:
    """BI_BITFIELDS BMP: masks after a 40-byte header, or inside a 108-byte BITMAPV4HEADER (v4)."""
    masks = masks or ((0xF800, 0x07E0, 0x001F) if bpp == 16 else (0x00FF0000, 0x0000FF00, 0x000000FF))
    row = ((w * bpp + 31) // 32) * 4
    if pixels is None:
        pixels = bytes(np.random.default_rng(2).integers(0, 255, row * h, dtype=np.uint8))
    if v4:
        hdr = (struct.pack("<IiiHHIIiiII", 108, w, h, 1, bpp, 3, len(pixels), 2835, 2835, 0, 0)
               + struct.pack("<4I", *masks, 0) + b"BGRs" + bytes(48))
    else:
        hdr = struct.pack("<IiiHHIIiiII", 40, w, h, 1, bpp, 3, len(pixels), 2835, 2835, 0, 0) + struct.pack("<3I", *masks)
    off = 14 + len(hdr)
    return b"BM" + struct.pack("<IHHI", off + len(pixels), 0, 0, off) + hdr + pixels


RGBX_MASKS = (0x000000FF, 0x0000FF00, 0x00FF0000)  # red in the first byte: the reverse of the usual BGRX


# --- other formats and odd files ---------------------------------------------------------------------

def other_format(ext: str) -> Callable[[], bytes]:
    def make() -> bytes:
        img = noise()
        if ext == ".pfm":
            return _encode(ext, img.astype(np.float32) / 255)
        if ext == ".hdr":
            return _encode(ext, img.astype(np.float32) / 255)
        return _encode(ext, img)
    make.__name__ = f"other_format_{ext[1:]}"
    return make


def gif() -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(noise()).save(buf, "GIF")
    return buf.getvalue()


ATTACKS: list[tuple[str, Callable[[], bytes], str]] = [
    ("empty.jpg", lambda: b"", "0 bytes"),
    ("one-byte.png", lambda: b"\x89", "1 byte"),
    ("sig-only.png", lambda: PNG_SIG, "PNG signature only"),
    ("ihdr-only.png", lambda: png_zeros(64, 64)[:33], "PNG signature + IHDR"),
    ("soi-sof-only.jpg", lambda: jpeg_sane_progressive(64)[:200], "JPEG header only"),
    ("tiff-header-only.tif", lambda: b"II*\x00\x08\x00\x00\x00", "TIFF header only"),
    ("1x1.png", lambda: png_extreme_aspect(1, 1), "1x1"),
    ("1x65535.png", lambda: png_zeros(1, 65535), "1x65535"),
    ("65535x1.png", lambda: png_zeros(65535, 1), "65535x1"),
    ("32x60000.png", lambda: png_extreme_aspect(32, 60_000), "32x60000 (extreme aspect, accepted size)"),
    ("60000x32.png", lambda: png_extreme_aspect(60_000, 32), "60000x32"),
    ("all-zero.png", lambda: png_flat(0), "all black"),
    ("all-255.png", lambda: png_flat(255), "all white"),
    ("alpha.png", png_with_alpha, "RGBA, fully transparent"),
    ("png-bomb-rgba16.png", png_bomb_rgba16, "64 MP RGBA 16-bit zlib bomb (512 MB raw)"),
    ("png-bomb-rgba16-adam7.png", png_bomb_rgba16_adam7, "same, Adam7 interlaced"),
    ("png-bomb-ga16-adam7.png", png_bomb_grey_alpha16_adam7, "64 MP grey+alpha 16-bit Adam7"),
    ("png-bomb-pal1.png", png_bomb_palette1, "64 MP 1-bit palette"),
    ("png-99k-text.png", png_many_text_chunks, "99,000 tEXt chunks"),
    ("png-110k-text.png", png_too_many_chunks, "110,000 tEXt chunks"),
    ("png-ztxt-bombs.png", png_ztxt_bombs, "1200 zTXt chunks of 8 MB zeros each"),
    ("png-iccp-bomb.png", png_iccp_bomb, "iCCP inflating to 512 MB"),
    ("png-exif-loop.png", png_exif_loop, "eXIf with IFD loop"),
    ("png-exif-rot.png", png_exif_orientation_rotates, "eXIf orientation 6"),
    ("apng-frame-huge.png", apng_frame_larger_than_canvas, "APNG fcTL 60000x60000 on 64x64"),
    ("apng-2nd-frame-huge.png", apng_second_frame_huge, "APNG 2 frames, 2nd 8000x8000"),
    ("apng-0-frames.png", apng_actl_zero_frames, "APNG acTL num_frames=0 with 2 frames"),
    ("apng-actl-late.png", apng_actl_after_idat, "acTL after IDAT"),
    ("png-plus-jpeg.png", png_with_jpeg_appended, "PNG with a JPEG appended"),
    ("jpeg-882-scans.jpg", jpeg_many_scans_valid, "64 MP progressive, 882 valid scans (CPU bomb)"),
    ("jpeg-3000-scans.jpg", jpeg_many_scans_repeated, "64 MP progressive, 3000 repeated scans"),
    ("jpeg-sane-progressive.jpg", jpeg_sane_progressive, "2000x2000 progressive, 5 scans"),
    ("jpeg-arith-garbage.jpg", jpeg_arithmetic_garbage, "SOF10 arithmetic, 2000 garbage scans"),
    ("jpeg-12bit.jpg", jpeg_12bit, "12-bit progressive"),
    ("jpeg-cmyk.jpg", jpeg_cmyk, "CMYK (Adobe)"),
    ("jpeg-orient-9.jpg", lambda: jpeg_exif_orientation(9), "EXIF orientation 9"),
    ("jpeg-orient-65535.jpg", lambda: jpeg_exif_orientation(65535), "EXIF orientation 65535"),
    ("jpeg-exif-loop.jpg", jpeg_exif_ifd_loop, "EXIF IFD loop"),
    ("jpeg-exif-huge-counts.jpg", jpeg_exif_huge_counts, "EXIF counts of gigabytes"),
    ("jpeg-500-app.jpg", jpeg_many_app_segments, "500 x 64 KB APP2 segments (33 MB)"),
    ("jpeg-dri-1.jpg", jpeg_restart_abuse, "DRI=1 without RST markers"),
    ("jpeg-90k-dht.jpg", jpeg_many_dht, "90,000 DHT segments"),
    ("jpeg-mpf-trailer.jpg", jpeg_with_big_mpf_trailer, "JPEG + 60000x60000 trailer"),
    ("tiff-huge-tiles.tif", tiff_huge_tiles, "64x64 with 65536x65536 tiles"),
    ("tiff-deflate-bomb.tif", tiff_deflate_bomb, "64 MP deflate bomb, one strip"),
    ("tiff-deflate-bomb-tiled.tif", lambda: tiff_deflate_bomb(tiled=True), "64 MP deflate, one 8000x8000 tile"),
    ("tiff-lzw-bomb.tif", lambda: tiff_pil("tiff_lzw"), "64 MP LZW"),
    ("tiff-packbits-bomb.tif", lambda: tiff_pil("packbits"), "64 MP PackBits"),
    ("tiff-jpeg.tif", lambda: tiff_pil("jpeg", 2000, "RGB"), "JPEG-in-TIFF 2000x2000 (PIL)"),
    ("tiff-jpeg-3000-scans.tif", tiff_jpeg_progressive_strip, "JPEG-in-TIFF, progressive strip, 3000 scans"),
    ("tiff-ojpeg-3000-scans.tif", tiff_ojpeg_progressive, "old-style JPEG TIFF, 3000 scans"),
    ("tiff-8x32f.tif", tiff_wide_float_samples, "64 MP x 8 float32 samples (2 GB)"),
    ("tiff-float-nan.tif", tiff_float_nan, "float32 all NaN"),
    ("tiff-planar.tif", tiff_planar, "planar config 2"),
    ("tiff-palette.tif", tiff_palette, "palette"),
    ("tiff-page2-huge.tif", tiff_second_page_huge_reduced, "page 2 60000x60000 flagged reduced"),
    ("webp-lossless-64mp.webp", webp_lossless_big, "8000x8000 lossless"),
    ("webp-animated.webp", webp_animated, "3-frame animation"),
    ("webp-anim-flag-cleared.webp", webp_anim_flag_cleared, "ANMF chunks, animation flag cleared"),
    ("bmp-rle8-bomb.bmp", bmp_rle8_bomb, "8000x8000 RLE8, 1 KB"),
    ("bmp-rle4-topdown.bmp", bmp_rle4_topdown, "RLE4 with negative height"),
    ("bmp-topdown.bmp", bmp_topdown, "top-down 24-bit"),
    ("bmp-bitfields16.bmp", lambda: bmp_bitfields(16), "16-bit bitfields"),
    ("bmp-bitfields32.bmp", lambda: bmp_bitfields(32), "32-bit bitfields"),
    ("bmp-bitfields32-rgbx.bmp", lambda: bmp_bitfields(32, RGBX_MASKS), "32-bit, R/B masks swapped, 40-byte header"),
    ("bmp-v4-rgbx.bmp", lambda: bmp_bitfields(32, RGBX_MASKS, v4=True), "32-bit, R/B masks swapped, V4 header"),
    ("bmp-bitfields32-10bit.bmp", lambda: bmp_bitfields(32, (0x3FF00000, 0xFFC00, 0x3FF)), "32-bit 10-10-10 masks"),
    ("gif.jpg", gif, "GIF named .jpg"),
    ("jp2.jpg", other_format(".jp2"), "JPEG 2000 named .jpg"),
    ("hdr.png", other_format(".hdr"), "Radiance HDR named .png"),
    ("pfm.png", other_format(".pfm"), "PFM named .png"),
    ("ppm.jpg", other_format(".ppm"), "PPM named .jpg"),
    ("ras.jpg", other_format(".ras"), "Sun raster named .jpg"),
    ("avif.jpg", other_format(".avif"), "AVIF named .jpg"),
    ("jpeg-as.png", lambda: _encode(".jpg", noise()), "JPEG content named .png"),
]


def tiff_damaged_tile(side: int = 64, tile: int = 16, damaged: int = 5) -> bytes:
    """Deflate-tiled TIFF whose tile `damaged` holds garbage instead of a zlib stream: libtiff reports it, and
    OpenCV still returns a full-size picture with that tile left blank."""
    n = (side // tile) ** 2
    rng = np.random.default_rng(9)
    tiles = [zlib.compress(bytes(rng.integers(0, 255, tile * tile, dtype=np.uint8))) for _ in range(n)]
    tiles[damaged] = b"\x00garbage, not a zlib stream" * 4
    entries = _tiff_base(side, side) + [(259, 3, 1, 8), (322, 4, 1, tile), (323, 4, 1, tile),
                                        (324, 4, n, b"\0" * 4 * n), (325, 4, n, struct.pack(f"<{n}I", *map(len, tiles)))]
    blob = b"".join(t + b"\0" * (len(t) & 1) for t in tiles)
    d = bytearray(tiff_ifd(entries, [blob]))
    ifd_end = 8 + 2 + 12 * len(entries) + 4
    offsets, at = [], ifd_end
    for t in tiles:
        offsets.append(at)
        at += len(t) + (len(t) & 1)
    tail = ifd_end + len(blob) + (len(blob) & 1)  # TileOffsets is the first out-of-line value (BitsPerSample inline)
    d[tail:tail + 4 * n] = struct.pack(f"<{n}I", *offsets)
    return bytes(d)


def tiff_damaged_strip(side: int = 64) -> bytes:
    """Two deflate strips, the second garbage."""
    good = zlib.compress(bytes(np.random.default_rng(4).integers(0, 255, side * side // 2, dtype=np.uint8)))
    bad = b"\x00garbage, not a zlib stream" * 4
    entries = _tiff_base(side, side) + [(259, 3, 1, 8), (273, 4, 2, b"\0" * 8), (278, 4, 1, side // 2),
                                        (279, 4, 2, struct.pack("<2I", len(good), len(bad)))]
    blob = good + b"\0" * (len(good) & 1) + bad
    d = bytearray(tiff_ifd(entries, [blob]))
    ifd_end = 8 + 2 + 12 * len(entries) + 4
    tail = ifd_end + len(blob) + (len(blob) & 1)
    d[tail:tail + 8] = struct.pack("<2I", ifd_end, ifd_end + len(good) + (len(good) & 1))
    return bytes(d)


ATTACKS += [
    ("tiff-damaged-tile.tif", tiff_damaged_tile, "deflate tile 5 of 16 is garbage"),
    ("tiff-damaged-strip.tif", tiff_damaged_strip, "deflate strip 2 of 2 is garbage"),
]


def jpeg_fill_bytes(mb: int = 20) -> bytes:
    """A small JPEG with `mb` MB of 0xFF fill bytes before its first segment (legal before any marker)."""
    j = _encode(".jpg", noise())
    return j[:2] + b"\xff" * (mb << 20) + j[2:]


def jpeg_empty_segments(mb: int = 20) -> bytes:
    """`mb` MB of empty APP0 segments (FF E0 00 02) before the frame header."""
    j = _encode(".jpg", noise())
    return j[:2] + b"\xff\xe0\x00\x02" * (mb << 18) + j[2:]


def tiff_many_entries(n_ifds: int = 16, n: int = 65535) -> bytes:
    """`n_ifds` directories of `n` entries each (tags the decoder skips: unknown type), all valid otherwise."""
    skip = {256, 257, 258, 259, 262, 273, 277, 278, 279, 322, 323, 324, 325, 330}
    out = bytearray(b"II*\x00" + struct.pack("<I", 8))
    base = [(256, 4, 1, 64), (257, 4, 1, 64), (258, 3, 1, 8), (259, 3, 1, 1), (262, 3, 1, 1), (273, 4, 1, 0),
            (277, 3, 1, 1), (278, 4, 1, 64), (279, 4, 1, 4096)]
    extra = [(t, 99, 1, 0) for t in range(400, 65535) if t not in skip and t not in (34665, 34853, 40965)]
    entries = sorted(base + extra[: n - len(base)])
    body = struct.pack("<H", len(entries)) + b"".join(struct.pack("<HHII", *e) for e in entries)
    for k in range(n_ifds):
        at = len(out)
        out += body + struct.pack("<I", at + len(body) + 4 if k < n_ifds - 1 else 0)
    strip = len(out)
    out += b"\x80" * 4096
    return bytes(out).replace(struct.pack("<HHII", 273, 4, 1, 0), struct.pack("<HHII", 273, 4, 1, strip))


ATTACKS += [
    ("jpeg-fill-20mb.jpg", jpeg_fill_bytes, "20 MB of 0xFF fill bytes before the first segment"),
    ("jpeg-empty-segments.jpg", jpeg_empty_segments, "5 million empty APP0 segments (20 MB)"),
    ("tiff-1m-entries.tif", tiff_many_entries, "16 directories of 65535 entries (12 MB)"),
]


def jpeg_progressive_64mp(sampling: int, shift: int = 0) -> bytes:
    """A legitimate 8000x8000 progressive JPEG (libjpeg's default scans): the decoder keeps every coefficient of
    the image in memory until the last scan (2 bytes per sample: 384 MB at 4:4:4), even at 1/8 scale."""
    cv2 = _cv2()
    y, x = np.mgrid[0:8000, 0:8000]
    img = np.dstack([(x % 256), (y % 256), ((x + y + shift) % 256)]).astype(np.uint8)
    return _encode(".jpg", img, [cv2.IMWRITE_JPEG_PROGRESSIVE, 1, cv2.IMWRITE_JPEG_SAMPLING_FACTOR, sampling,
                                 cv2.IMWRITE_JPEG_QUALITY, 80])


ATTACKS += [
    ("jpeg-64mp-progressive-444.jpg", lambda: jpeg_progressive_64mp(_cv2().IMWRITE_JPEG_SAMPLING_FACTOR_444),
     "legitimate 64 MP progressive JPEG, 4:4:4"),
    ("jpeg-64mp-progressive-420.jpg", lambda: jpeg_progressive_64mp(_cv2().IMWRITE_JPEG_SAMPLING_FACTOR_420),
     "legitimate 64 MP progressive JPEG, 4:2:0"),
]
