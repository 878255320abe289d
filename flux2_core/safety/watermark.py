"""Invisible pixel watermark: a fixed 48-bit message, embedded with invisible-watermark's ``dwtDct``.

BFL's reference marks FLUX.2 outputs with the same library, method and message constant. The
constant is written as 48 binary digits but starts with two zeros, and BFL turns it into bits with
``bin()``, which drops them, so BFL's images carry 46 bits. Flux2Local embeds all 48 digits
(``WATERMARK_BITS``); ``read_watermark`` recognises both layouts.

How the library behaves (checked against invisible-watermark 0.2.0):
- ``dwtDct`` quantises the largest DCT coefficient of 4x4 blocks of the Haar-wavelet approximation
  of the U chroma channel (YUV); each block holds one bit and the message repeats over the image,
  so reading takes a majority vote per bit. The luma channel is left alone.
- It refuses images with fewer than 256 x 256 pixels (height x width).
- It expects OpenCV's BGR channel order. OpenCV offsets chroma differently for float and 8-bit
  images; embedding on 8-bit BGR reads back from a PNG as written, so marking works on uint8.
- JPEG with PIL's default 4:2:0 chroma subsampling halves the U channel's resolution and erases the
  mark; a JPEG saved with ``subsampling=0`` (4:4:4) at quality 90 keeps it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from ..errors import InputError
from .deps import require

logger = logging.getLogger(__name__)

# The message constant of BFL's reference watermark ("a fixed 48-bit message chosen at random").
WATERMARK_MESSAGE = 0b001010101111111010000111100111001111010100101110
WATERMARK_BITS: tuple[int, ...] = tuple(int(b) for b in format(WATERMARK_MESSAGE, "048b"))
# What BFL's code embeds: bin() drops the two leading zeros.
BFL_REFERENCE_BITS: tuple[int, ...] = tuple(int(b) for b in bin(WATERMARK_MESSAGE)[2:])
LAYOUTS: dict[str, tuple[int, ...]] = {"flux2local-48": WATERMARK_BITS, "bfl-46": BFL_REFERENCE_BITS}

MIN_PIXELS = 256 * 256  # invisible-watermark refuses smaller images (rows x cols)
# Share of bits that must agree with the message to call an image marked: 42 of 48, 41 of 46. An
# unmarked image agrees on about half the bits (binomial, p = 1/2), so P(>= 42 of 48) = 5e-8 and
# P(>= 41 of 46) = 2e-8, while marked 256x256 images measured 44-48 bits from PNG and from JPEG q90
# (4:4:4), larger ones all 48.
MATCH_FRACTION = 0.87
METHOD = "dwtDct"


@dataclass(frozen=True)
class WatermarkReading:
    """What ``read_watermark`` found.

    Attributes:
        found: the image carries the FLUX.2 message (in either layout).
        layout: ``"flux2local-48"`` (this pack), ``"bfl-46"`` (BFL's reference code) or None.
        matching_bits: bits agreeing with the message in the best layout.
        total_bits: that layout's length.
        note: a short explanation (e.g. why nothing could be read).
    """

    found: bool
    layout: str | None
    matching_bits: int
    total_bits: int
    note: str = ""

    def summary(self) -> str:
        if self.found:
            return f"watermark found ({self.layout}, {self.matching_bits}/{self.total_bits} bits match)"
        if self.total_bits == 0:
            return f"no watermark ({self.note})"
        return (
            f"no watermark (best match {self.matching_bits}/{self.total_bits} bits, as for an unmarked image)"
        )


def _check_rgb(rgb: np.ndarray, what: str) -> np.ndarray:
    """(H, W, 3) uint8 RGB, contiguous; InputError otherwise."""
    if not isinstance(rgb, np.ndarray) or rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        shape = getattr(rgb, "shape", None)
        raise InputError(f"{what}: expected an (H, W, 3) uint8 RGB array, got {type(rgb).__name__} {shape}.")
    return np.ascontiguousarray(rgb)


def can_carry_watermark(height: int, width: int) -> bool:
    """True if an image of this size is large enough for the watermark (256 x 256 pixels or more)."""
    return height * width >= MIN_PIXELS


def embed_watermark(rgb: np.ndarray, bits: tuple[int, ...] = WATERMARK_BITS) -> np.ndarray:
    """Embeds the FLUX.2 watermark into an 8-bit RGB image.

    Args:
        rgb: (H, W, 3) uint8 RGB with H x W >= 256 x 256.
        bits: the message (default: the 48-bit FLUX.2 message).

    Returns:
        A new (H, W, 3) uint8 RGB array carrying the mark.

    Raises:
        InputError: the image is smaller than 256 x 256 pixels (the library cannot mark it).
        MissingPackageError: invisible-watermark is not installed.
    """
    rgb = _check_rgb(rgb, "watermark")
    h, w = rgb.shape[:2]
    if not can_carry_watermark(h, w):
        raise InputError(
            f"the image is {w}x{h} ({h * w} pixels); the invisible watermark needs at least 256x256 "
            f"({MIN_PIXELS} pixels). Generate a larger image or turn the watermark off for this one."
        )
    imwatermark = require("imwatermark", "the invisible watermark")
    encoder = imwatermark.WatermarkEncoder()
    encoder.set_watermark("bits", list(bits))
    bgr = encoder.encode(np.ascontiguousarray(rgb[:, :, ::-1]), METHOD)  # uint8 in, uint8 out
    return np.ascontiguousarray(bgr[:, :, ::-1])


def _decode(bgr: np.ndarray, n_bits: int) -> np.ndarray:
    imwatermark = require("imwatermark", "reading the invisible watermark")
    decoder = imwatermark.WatermarkDecoder("bits", n_bits)
    return np.asarray(decoder.decode(bgr, METHOD), dtype=np.int64)


def read_watermark(rgb: np.ndarray) -> WatermarkReading:
    """Reads the FLUX.2 watermark from an 8-bit RGB image (as decoded from a PNG or JPEG file).

    Args:
        rgb: (H, W, 3) uint8 RGB.

    Returns:
        A ``WatermarkReading``; ``found`` is True when at least ``MATCH_FRACTION`` of the bits of
        either layout agree with the message.
    """
    rgb = _check_rgb(rgb, "watermark check")
    h, w = rgb.shape[:2]
    if not can_carry_watermark(h, w):
        return WatermarkReading(False, None, 0, 0, f"{w}x{h} is smaller than 256x256, too small to carry one")
    bgr = np.ascontiguousarray(rgb[:, :, ::-1])
    best: tuple[float, str, int, int] | None = None
    for layout, bits in LAYOUTS.items():
        got = _decode(bgr, len(bits))
        match = int((got == np.asarray(bits)).sum())
        score = match / len(bits)
        if best is None or score > best[0]:
            best = (score, layout, match, len(bits))
    score, layout, match, total = best
    found = score >= MATCH_FRACTION
    logger.debug("watermark: best layout %s, %d/%d bits", layout, match, total)
    return WatermarkReading(found, layout if found else None, match, total)
