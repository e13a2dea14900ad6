"""What the image decoders say about a file while decoding it, and which of it means "damaged".

A JPEG has no checksum. When bytes inside its entropy-coded data change (a
failing SD card, a broken transfer), libjpeg-turbo does not fail: it fills what
it cannot decode with grey, resynchronises, and returns a full-size image -
part photograph, part garbage - and the model screens the garbage. The only
sign is a warning the library prints to stderr ("Corrupt JPEG data: premature
end of data segment", "... N extraneous bytes before marker 0xd9", "bad
Huffman code"); OpenCV neither raises nor returns it. libpng does the same for
zlib-level damage it can step over ("libpng warning: Too much image data").

So each decode worker (a single-threaded process: nothing else writes to its
stderr meanwhile) points its file descriptor 2 at a private memory file for
the length of one decode and reads what the decoder wrote. That is exactly
what a library exposing the warnings sees (measured: simplejpeg's strict mode
flags the same files with the same words, for a second JPEG library in the
wheel), at the cost of two dup2 calls per image, and without a new
dependency.

Which messages mean the pixels are not what the camera recorded is decided
here, by format: every libjpeg "Corrupt JPEG data"/"Premature end" warning
except a damaged ICC profile (the pixels are intact), libpng's errors and its
image-data and zlib warnings, and libtiff's errors (a strip or tile that cannot be decompressed
or read: OpenCV leaves it blank and returns the rest); colour-profile and text-chunk warnings, and anything
else a library prints, are only passed on to the agent's log.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass

# libjpeg(-turbo) warnings (jerror.h JWRN_*) that mean the image data is damaged or incomplete.
_JPEG_DAMAGE = ("corrupt jpeg data", "premature end of jpeg file", "inconsistent progression sequence",
                "invalid sos parameters", "application transferred too many scanlines")
_JPEG_HARMLESS = ("bad icc marker",)  # the embedded colour profile only: OpenCV ignores it anyway
# libpng warnings about the image data stream (the chunk CRCs are checked before decoding, containers.py).
_PNG_DAMAGE = ("image data", "compressed data", "idat", "crc error", "incorrect header check",
               "invalid distance", "invalid block type", "invalid stored block", "invalid code",
               "unexpected end", "read error", "zstream", "decompression error")
# libtiff reports through TIFFError only what stops it from reading (a strip or tile it cannot decompress or
# read); its recoverable oddities (unknown tags, odd counts) are TIFFWarning, which OpenCV logs at WARNING level,
# below the agent's OPENCV_LOG_LEVEL. OpenCV still returns the picture with that strip or tile left blank.
_TIFF_DAMAGE = ("tiff_error",)
# OpenCV's log prefix before libtiff's words: "[ERROR:0@1.0] global grfmt_tiff.cpp:117 TIFF_Error "
_OPENCV_PREFIX = re.compile(r"^\[\s*\w+:[^\]]*\]\s+global\s+\S+\s+TIFF_(Error|Warning)\s+")
MAX_CAPTURE = 64 << 10  # a decoder warns once per problem; more than this is noise


@dataclass(frozen=True)
class Verdict:
    """`damage`: the decoder's own words about damaged image data ('' if none); `notes`: other output."""
    damage: str
    notes: str


def classify(fmt: str, text: str) -> Verdict:
    """Split a decode's stderr into damage (the file gets a `corrupt` outcome) and harmless notes."""
    damage: list[str] = []
    notes: list[str] = []
    for line in (ln.strip() for ln in text.splitlines()):
        if not line:
            continue
        low = line.lower()
        if fmt == "tiff":
            m = _OPENCV_PREFIX.match(line)
            if m:  # OpenCV's log prefix, then libtiff's own words: keep those, named as libtiff's
                line = f"libtiff {m.group(1).lower()}: {line[m.end():]}"
        if fmt == "jpeg":
            bad = any(k in low for k in _JPEG_DAMAGE) and not any(k in low for k in _JPEG_HARMLESS)
        elif fmt == "png":
            bad = low.startswith("libpng error") or (low.startswith("libpng") and any(k in low for k in _PNG_DAMAGE))
        elif fmt == "tiff":
            bad = any(k in low for k in _TIFF_DAMAGE)
        else:
            bad = False
        (damage if bad else notes).append(line)
    return Verdict("; ".join(dict.fromkeys(damage)), "; ".join(dict.fromkeys(notes)))


class StderrCapture:
    """Points fd 2 at a memory file around one decode; for single-threaded processes (the decode workers).

    Reusable: one memory file per process, emptied before each use. Use as
    `with cap: ...decode...` then `cap.text`.
    """

    def __init__(self) -> None:
        try:
            self._fd = os.memfd_create("edge-agent-decoder-stderr", os.MFD_CLOEXEC)
        except (AttributeError, OSError):  # pragma: no cover - not Linux
            import tempfile

            self._fd = os.dup(tempfile.TemporaryFile().fileno())
        self._saved = -1
        self.text = ""

    def __enter__(self) -> StderrCapture:
        os.ftruncate(self._fd, 0)
        os.lseek(self._fd, 0, os.SEEK_SET)
        self._saved = os.dup(2)
        os.dup2(self._fd, 2)
        return self

    def __exit__(self, *exc: object) -> None:
        os.dup2(self._saved, 2)
        os.close(self._saved)
        self._saved = -1
        self.text = os.pread(self._fd, MAX_CAPTURE, 0).decode("utf-8", "replace")

    def close(self) -> None:
        os.close(self._fd)
