"""Check an image file's container structure before any decoder sees it.

A decoder trusts the structure it parses: a PNG chunk whose length field claims
4 GB makes OpenCV's PNG reader allocate 4 GB for a 45 KB file; a TIFF whose
ImageWidth tag appears twice has one size for a header reader and another for
libtiff, so a pixel limit checked on the header is not the limit libtiff
decodes at. So every structure a decoder will follow is walked here first,
with the rules of the format's specification (chunk lengths inside the file,
CRCs, IHDR first, TIFF tags unique and ascending, offsets inside the file,
RIFF sizes, BMP header sizes, one JPEG frame header), and anything ambiguous is
refused before one pixel is allocated. The walk is linear in the number of
chunks, tags or segments, not in the pixels: well under a millisecond for a
camera photo. The one exception is PNG's per-chunk CRC, which covers every
byte: it is the only integrity check any of these formats carries, and a
damaged IDAT otherwise decodes to garbage (or libpng gives up half-way) -
zlib.crc32 runs at about 1 GB/s here, a few ms for a large PNG.

Each function raises `Rejected` ("corrupt", or "truncated" where an
interrupted copy explains the damage) with a reason a person can act on.
"""
from __future__ import annotations

import struct
import zlib

from .rejection import Rejected

MAX_SEGMENTS = 100_000  # chunks/segments walked at most; real files have a few thousand
# A progressive JPEG decoder visits every block of the image once per scan, however little data a scan holds: a
# 64 MP file with 882 legal one-coefficient scans (228 KB) took 13 s of CPU, 3000 repeated scans (476 KB) 15 s,
# and the count is unbounded. Encoders write 1 (baseline) to about 10 (libjpeg's progression) or ~20 (mozjpeg's
# optimised scans); libjpeg-turbo's own guard for untrusted files (TJPARAM_SCANLIMIT) exists for this reason.
MAX_JPEG_SCANS = 100
# libpng inflates every zTXt, compressed iTXt and iCCP chunk while reading the header, up to 8 MB each: 1200
# zTXt chunks of 8 KB (10 MB) took 18 s of CPU. Real files carry a handful (a profile, XMP, an EXIF text).
MAX_PNG_INFLATED_CHUNKS = 16
# 0xFF fill bytes may precede any marker; encoders write none or a few. The header walks step over them one by
# one in Python: 50 MB of them cost 5.5 s of CPU per walk (and the agent itself looked at JPEG headers).
MAX_JPEG_FILL = 65_536
PNG_END = b"IEND\xaeB`\x82"


def _corrupt(fmt: str, what: str) -> Rejected:
    return Rejected("corrupt", f"corrupt {fmt} file: {what}; the file is damaged or was crafted - re-export the "
                               "image from the camera software and send it again")


def _truncated(fmt: str, n: int) -> Rejected:
    return Rejected("truncated", f"truncated {fmt} file ({n} bytes): the image data ends early; the copy was "
                                 "probably interrupted - send the image again", maybe_incomplete=True)


def check_structure(data: bytes, fmt: str) -> None:
    """Walk the container of a sniffed `fmt` file; raise Rejected on anything a decoder could misread."""
    try:
        {"png": check_png, "tiff": check_tiff, "webp": check_webp, "bmp": check_bmp, "jpeg": check_jpeg}[fmt](data)
    except (struct.error, IndexError):
        raise _truncated(fmt.upper(), len(data)) from None


# --- PNG -----------------------------------------------------------------------------------

_PNG_COLOUR_DEPTHS = {0: (1, 2, 4, 8, 16), 2: (8, 16), 3: (1, 2, 4, 8), 4: (8, 16), 6: (8, 16)}
_PNG_CRITICAL = {b"IHDR", b"PLTE", b"IDAT", b"IEND"}


def check_png(d: bytes) -> None:
    """IHDR first (13 bytes, valid CRC and fields), every chunk inside the file with a valid CRC, IDATs
    contiguous, IEND last.

    Every chunk's CRC is checked, ancillary ones too: a mismatch means the file changed after it was
    written (a damaged card, a broken transfer), and the same damage may sit where no check sees it.
    """
    n = len(d)
    ended = d.rfind(PNG_END) > 0  # the end marker is there: a complete file, whatever its chunks claim
    length, kind = struct.unpack(">I4s", d[8:16])
    if kind != b"IHDR" or length != 13:
        raise _corrupt("PNG", "the first chunk is not a 13-byte IHDR")
    if zlib.crc32(d[12:29]) & 0xFFFFFFFF != struct.unpack(">I", d[29:33])[0]:
        raise _corrupt("PNG", "the IHDR chunk fails its CRC check")
    w, h, depth, colour, compression, filt, interlace = struct.unpack(">IIBBBBB", d[16:29])
    if w > 2**31 - 1 or h > 2**31 - 1:
        raise _corrupt("PNG", f"IHDR declares {w}x{h}, beyond the format's limit")
    if depth not in _PNG_COLOUR_DEPTHS.get(colour, ()) or compression or filt or interlace > 1:
        raise _corrupt("PNG", f"IHDR has an invalid combination (bit depth {depth}, colour type {colour}, "
                              f"compression {compression}, filter {filt}, interlace {interlace})")
    pos, idat_runs, last_idat, seen, inflated = 33, 0, False, 0, 0
    while True:
        if pos + 12 > n:
            raise _truncated("PNG", n)
        length, kind = struct.unpack(">I4s", d[pos:pos + 8])
        seen += 1
        if length > 2**31 - 1 or pos + 12 + length > n:
            if not ended:
                raise _truncated("PNG", n)
            raise _corrupt("PNG", f"chunk {kind!r} at byte {pos} claims {length} bytes but only {n - pos - 12} remain")
        if not all(65 <= c <= 90 or 97 <= c <= 122 for c in kind):
            raise _corrupt("PNG", f"invalid chunk type {kind!r} at byte {pos}")
        if kind == b"IHDR":
            raise _corrupt("PNG", "a second IHDR chunk")
        if kind == b"IDAT":
            idat_runs += not last_idat
            if idat_runs > 1:
                raise _corrupt("PNG", "the IDAT chunks are not consecutive")
        elif kind[0] < 97 and kind not in _PNG_CRITICAL:  # upper-case first letter: critical, unknown
            raise _corrupt("PNG", f"unknown critical chunk {kind!r}")
        last_idat = kind == b"IDAT"
        if kind in (b"zTXt", b"iCCP") or (kind == b"iTXt" and _itxt_compressed(d, pos + 8, length)):
            inflated += 1
            if inflated > MAX_PNG_INFLATED_CHUNKS:
                raise _corrupt("PNG", f"more than {MAX_PNG_INFLATED_CHUNKS} compressed metadata chunks (zTXt, "
                                      "iTXt, iCCP), each of which the decoder must inflate before the image - no "
                                      "camera writes that many")
        with memoryview(d) as view:  # no copy of a mapped file; released before the caller closes the map
            crc = zlib.crc32(view[pos + 4:pos + 8 + length]) & 0xFFFFFFFF
        if crc != struct.unpack(">I", d[pos + 8 + length:pos + 12 + length])[0]:
            raise _corrupt("PNG", f"the {kind.decode('ascii')} chunk at byte {pos} fails its CRC check (the "
                                  "file's bytes changed after it was written)")
        if kind == b"IEND":
            if length:
                raise _corrupt("PNG", "the IEND chunk is not empty")
            break
        pos += 12 + length
        if seen > MAX_SEGMENTS:
            raise _corrupt("PNG", f"more than {MAX_SEGMENTS} chunks")
    if not idat_runs:
        raise _corrupt("PNG", "no image data (IDAT) before IEND")


def _itxt_compressed(d: bytes, start: int, length: int) -> bool:
    """iTXt: keyword (1-79 bytes), NUL, then the compression flag."""
    nul = d.find(b"\0", start, start + min(length, 80))
    return nul >= 0 and nul + 1 < start + length and d[nul + 1] == 1


# --- TIFF ----------------------------------------------------------------------------------

# type -> size in bytes of one value (TIFF 6.0 types 1-12, 13 = IFD)
_TIFF_SIZES = {1: 1, 2: 1, 3: 2, 4: 4, 5: 8, 6: 1, 7: 1, 8: 2, 9: 4, 10: 8, 11: 4, 12: 8, 13: 4}
_TIFF_NAMES = {256: "ImageWidth", 257: "ImageLength", 258: "BitsPerSample", 259: "Compression",
               273: "StripOffsets", 277: "SamplesPerPixel", 278: "RowsPerStrip", 279: "StripByteCounts",
               322: "TileWidth", 323: "TileLength", 324: "TileOffsets", 325: "TileByteCounts", 330: "SubIFDs"}
_TIFF_POINTERS = (330, 34665, 34853, 40965)  # SubIFDs, EXIF, GPS, Interoperability: IFDs a reader may follow
MAX_IFDS = 64
MAX_SAMPLES = 8  # SamplesPerPixel above this is no photograph (and multiplies the decoded size)
MAX_BITS = 32


class _Tiff:
    def __init__(self, d: bytes) -> None:
        self.d, self.n = d, len(d)
        self.e = "<" if d[:2] == b"II" else ">"
        self.visited: set[int] = set()
        self.entries = 0  # directory entries walked, all directories together (each is a Python step)

    def u(self, code: str, at: int) -> int:
        return struct.unpack(self.e + code, self.d[at:at + struct.calcsize(code)])[0]

    def values(self, typ: int, count: int, at: int) -> list[int]:
        code = {1: "B", 3: "H", 4: "I", 13: "I"}.get(typ)
        if code is None or count > 1_000_000:
            return []
        size = _TIFF_SIZES[typ]
        where = at if count * size <= 4 else self.u("I", at)
        return list(struct.unpack(f"{self.e}{count}{code}", self.d[where:where + count * size]))

    def ifd(self, off: int, depth: int = 0) -> int:
        """Check one IFD (and the IFDs it points to); returns the offset of the next IFD in its chain."""
        if off < 8:
            raise _corrupt("TIFF", f"a directory offset ({off}) points into the file header")
        if off + 2 > self.n:
            raise _truncated("TIFF", self.n)  # directories often come last: an interrupted copy looks like this
        if off in self.visited:
            raise _corrupt("TIFF", f"the directories form a loop (offset {off} is reached twice)")
        self.visited.add(off)
        if len(self.visited) > MAX_IFDS:
            raise _corrupt("TIFF", f"more than {MAX_IFDS} directories")
        count = self.u("H", off)
        end = off + 2 + 12 * count + 4
        if count == 0:
            raise _corrupt("TIFF", f"the directory at {off} is empty")
        if end > self.n:
            raise _truncated("TIFF", self.n)
        self.entries += count
        if self.entries > MAX_SEGMENTS:  # 64 directories of 65535 entries (47 MB) took 5 s of CPU to walk
            raise _corrupt("TIFF", f"more than {MAX_SEGMENTS} directory entries (real files have a few dozen)")
        prev = -1
        tags: dict[int, list[int]] = {}
        for k in range(count):
            p = off + 2 + 12 * k
            tag, typ, cnt = self.u("H", p), self.u("H", p + 2), self.u("I", p + 4)
            label = _TIFF_NAMES.get(tag, f"tag {tag}")
            if tag == prev:
                raise _corrupt("TIFF", f"{label} appears twice in one directory (readers disagree on which "
                                       "value counts)")
            if tag < prev:
                raise _corrupt("TIFF", f"tags are not in ascending order ({label} after tag {prev})")
            prev = tag
            size = _TIFF_SIZES.get(typ)
            if size is None:
                if tag in _TIFF_NAMES:
                    raise _corrupt("TIFF", f"{label} has unknown field type {typ}")
                continue  # unknown type on a tag no decoder here needs: readers skip it
            if cnt * size > 4 and self.u("I", p + 8) + cnt * size > self.n:
                if cnt * size > self.n:  # more than the whole file: no interrupted copy explains that
                    raise _corrupt("TIFF", f"{label} claims {cnt * size} bytes in a {self.n}-byte file")
                raise _truncated("TIFF", self.n)
            if tag in _TIFF_NAMES or tag in _TIFF_POINTERS:
                tags[tag] = self.values(typ, cnt, p + 8)
        if depth == 0:
            self._image_tags(tags)
        for sub in tags.get(330, [])[:MAX_IFDS]:  # SubIFDs: images a reader may decode, checked as strictly
            if depth < 2:
                nxt = self.ifd(sub, depth + 1)
                while nxt:
                    nxt = self.ifd(nxt, depth + 1)
        for t in _TIFF_POINTERS[1:]:  # EXIF, GPS, Interoperability: metadata; only their bounds matter here
            for sub in tags.get(t, [])[:1]:
                if sub < 8 or sub + 2 > self.n or sub + 2 + 12 * self.u("H", sub) > self.n:
                    raise _corrupt("TIFF", f"the {'EXIF' if t == 34665 else 'GPS' if t == 34853 else 'interoperability'}"
                                           f" directory at offset {sub} is outside the {self.n}-byte file")
        return self.u("I", end - 4)

    def _image_tags(self, tags: dict[int, list[int]]) -> None:
        for t in (256, 257):
            if len(tags.get(t, [])) != 1:
                raise _corrupt("TIFF", f"{_TIFF_NAMES[t]} must hold exactly one value, not {len(tags.get(t, []))}")
        spp = tags.get(277, [1])
        if len(spp) != 1 or not 1 <= spp[0] <= MAX_SAMPLES:
            raise _corrupt("TIFF", f"SamplesPerPixel {spp} is not a photograph's (1 to {MAX_SAMPLES})")
        bits = tags.get(258, [1])
        if not bits or any(not 1 <= b <= MAX_BITS for b in bits):
            raise _corrupt("TIFF", f"BitsPerSample {bits[:8]} is outside 1 to {MAX_BITS}")
        for offs, counts in ((273, 279), (324, 325)):
            if len(tags.get(offs, [])) != len(tags.get(counts, [])):
                raise _corrupt("TIFF", f"{_TIFF_NAMES[offs]} and {_TIFF_NAMES[counts]} disagree on the number "
                                       "of pieces")


def check_tiff(d: bytes) -> None:
    """Every directory (the page chain, SubIFDs, EXIF/GPS) inside the file, loop-free, with unique, ascending
    tags whose values lie inside the file; one width and one height; a sane sample layout."""
    t = _Tiff(d)
    off = t.u("I", 4)
    while off:
        off = t.ifd(off)


# --- WebP ----------------------------------------------------------------------------------

def check_webp(d: bytes) -> None:
    """The RIFF size covers the chunks (each inside it); a VP8X canvas equals its bitstream's frame size."""
    n = len(d)
    riff = struct.unpack("<I", d[4:8])[0]
    if riff < 4:
        raise _corrupt("WebP", f"RIFF size {riff} is invalid")
    if n < riff + 8:
        raise _truncated("WebP", n)
    end, pos, seen = riff + 8, 12, 0
    sizes: dict[bytes, tuple[int, int]] = {}
    while pos < end:
        if pos + 8 > end:
            raise _corrupt("WebP", f"a chunk header at byte {pos} crosses the RIFF end")
        kind, length = d[pos:pos + 4], struct.unpack("<I", d[pos + 4:pos + 8])[0]
        if pos + 8 + length > end:
            raise _corrupt("WebP", f"chunk {kind!r} at byte {pos} claims {length} bytes, beyond the RIFF size")
        body = d[pos + 8:pos + 8 + length]
        if kind == b"VP8 " and len(body) >= 10 and b"VP8 " not in sizes:
            w, h = struct.unpack("<HH", body[6:10])
            sizes[kind] = (w & 0x3FFF, h & 0x3FFF)
        elif kind == b"VP8L" and len(body) >= 5 and b"VP8L" not in sizes:
            b = struct.unpack("<I", body[1:5])[0]
            sizes[kind] = (1 + (b & 0x3FFF), 1 + ((b >> 14) & 0x3FFF))
        elif kind == b"VP8X" and len(body) >= 10:
            sizes[kind] = (int.from_bytes(body[4:7], "little") + 1, int.from_bytes(body[7:10], "little") + 1)
        pos += 8 + length + (length & 1)
        seen += 1
        if seen > MAX_SEGMENTS:
            raise _corrupt("WebP", f"more than {MAX_SEGMENTS} chunks")
    if b"VP8X" in sizes and not d[20] & 0x02:  # still image: the bitstream must be the canvas
        frame = sizes.get(b"VP8 ") or sizes.get(b"VP8L")
        if frame is None:
            raise _corrupt("WebP", "an extended WebP without image data")
        if frame != sizes[b"VP8X"]:
            raise _corrupt("WebP", f"the canvas says {sizes[b'VP8X'][0]}x{sizes[b'VP8X'][1]} but the image data "
                                   f"is {frame[0]}x{frame[1]}")


# --- BMP -----------------------------------------------------------------------------------

_BMP_DIB = (12, 40, 52, 56, 64, 108, 124)
# Colour masks (R, G, B) of BI_BITFIELDS images that OpenCV decodes as the masks say. With a header shorter than
# BITMAPV4HEADER (108 bytes) it ignores 32-bit masks and reads the bytes as B, G, R, X: masks of R=0xFF,
# B=0xFF0000 (what some software writes) came out with red and blue swapped, 10-bit masks as garbage - while every
# viewer honours them. 16-bit images decode right with 5-6-5 and 5-5-5 masks only (others fail to decode).
_BMP_MASKS = {16: ((0xF800, 0x07E0, 0x001F), (0x7C00, 0x03E0, 0x001F)), 32: ((0xFF0000, 0xFF00, 0xFF),)}


def check_bmp(d: bytes) -> None:
    """Known DIB header size, one plane, a real bit depth and compression, pixel data inside the file."""
    n = len(d)
    offbits, dib = struct.unpack("<II", d[10:18])
    if dib not in _BMP_DIB:
        raise _corrupt("BMP", f"unknown DIB header size {dib}")
    if 14 + dib > n:
        raise _truncated("BMP", n)
    if dib == 12:
        planes, bpp = struct.unpack("<HH", d[22:26])
        compression, colours, h = 0, 0, 1
    else:
        h = struct.unpack("<i", d[22:26])[0]
        planes, bpp, compression = struct.unpack("<HHI", d[26:34])
        colours = struct.unpack("<I", d[46:50])[0] if dib >= 40 else 0
    if planes != 1 or bpp not in (1, 4, 8, 16, 24, 32):
        raise _corrupt("BMP", f"{planes} planes at {bpp} bits per pixel")
    if compression not in (0, 1, 2, 3, 6):
        raise _corrupt("BMP", f"unsupported compression {compression} (embedded JPEG/PNG or unknown)")
    if h == -2**31:
        raise _corrupt("BMP", "the height field holds an impossible value")
    if colours > 2**16 or (bpp <= 8 and colours > 2**bpp):
        raise _corrupt("BMP", f"the palette claims {colours} colours for {bpp}-bit pixels")
    if not 14 + dib <= offbits <= n:
        raise _corrupt("BMP", f"pixel data offset {offbits} is outside the header-to-end range 14+{dib}..{n}")
    if compression in (3, 6) and bpp in _BMP_MASKS and not (bpp == 32 and dib >= 108):
        if 66 > offbits:
            raise _corrupt("BMP", "the colour masks of a bit-field image overlap its pixel data")
        masks = struct.unpack("<3I", d[54:66])  # after a 40-byte header, inside the longer ones: same place
        if masks not in _BMP_MASKS[bpp]:
            raise Rejected("unsupported", f"{bpp}-bit BMP with colour masks R={masks[0]:#x} G={masks[1]:#x} "
                           f"B={masks[2]:#x} in a {dib}-byte header: the decoder would not apply them, so its "
                           "colours would differ from what a viewer shows - re-export the image as PNG or JPEG")


# --- JPEG ----------------------------------------------------------------------------------

_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
_ARITHMETIC = {0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF, 0xCC}  # SOF9-11, SOF13-15 and DAC


def check_jpeg(d: bytes) -> None:
    """Exactly one frame header (SOF) before the first scan, its length consistent with its components,
    a real height (0 would defer it to a DNL marker, which the decoder does not honour), Huffman coding (not
    arithmetic), and at most MAX_JPEG_SCANS scans in the image data."""
    i, n, frames, seen, fill = 2, len(d), 0, 0, 0
    while i + 4 <= n:
        if d[i] != 0xFF:
            raise _corrupt("JPEG", f"invalid marker structure at byte {i}")
        marker = d[i + 1]
        if marker == 0xFF:
            i += 1
            fill += 1
            if fill > MAX_JPEG_FILL:
                raise _corrupt("JPEG", f"more than {MAX_JPEG_FILL} fill bytes (0xFF) between header segments")
            continue
        if marker == 0xDA:
            _count_scans(d, i)
            break
        if marker == 0x01 or 0xD0 <= marker <= 0xD9:
            raise _corrupt("JPEG", f"marker FF{marker:02X} where a header segment belongs")
        if marker in _ARITHMETIC:
            raise Rejected("unsupported", "arithmetic-coded JPEG (marker FF{:02X}): cameras and dermatoscopes do not "
                           "write it, browsers cannot show it, and damage in its data goes unreported by the decoder "
                           "(a file of random scan data decoded to a picture without a warning) - re-export the "
                           "image as a standard (baseline or progressive) JPEG or as PNG".format(marker))
        seglen = struct.unpack(">H", d[i + 2:i + 4])[0]
        if seglen < 2:
            raise _corrupt("JPEG", f"segment FF{marker:02X} has length {seglen}")
        if marker in _SOF:
            frames += 1
            if frames > 1:
                raise _corrupt("JPEG", "two frame headers (SOF): decoders disagree on the image size")
            precision, h, w, comps = struct.unpack(">BHHB", d[i + 4:i + 10])
            if seglen != 8 + 3 * comps or comps not in (1, 3, 4):
                raise _corrupt("JPEG", f"frame header with {comps} components and length {seglen}")
            if h == 0 or w == 0:
                raise _corrupt("JPEG", f"frame header declares {w}x{h} (a height defined later by DNL is not "
                                       "supported)")
            if precision not in (8, 12):
                raise _corrupt("JPEG", f"{precision}-bit samples")
        i += 2 + seglen
        seen += 1
        if seen > MAX_SEGMENTS:
            raise _corrupt("JPEG", f"more than {MAX_SEGMENTS} header segments")


def _count_scans(d: bytes, first_sos: int) -> None:
    """Scans (SOS markers) from the first one to the end of the image (EOI). 0xFF in entropy-coded data is always
    followed by 0x00 (stuffing) or a marker, so FF DA inside the image data is a scan header; a second image
    appended after EOI (a phone's depth map or gain map) is not the decoder's business and not counted."""
    end = d.find(b"\xff\xd9", first_sos)
    end = end if end >= 0 else len(d)
    scans, at = 0, first_sos
    while scans <= MAX_JPEG_SCANS and 0 <= at < end:  # find(), not count(): a mapped file has no count()
        scans += 1
        at = d.find(b"\xff\xda", at + 2, end)
    if scans > MAX_JPEG_SCANS:
        raise _corrupt("JPEG", f"more than {MAX_JPEG_SCANS} scans (encoders write 1 to about 20): "
                               "each scan makes the decoder pass over the whole image again, so a small file can "
                               "keep it busy for minutes")
