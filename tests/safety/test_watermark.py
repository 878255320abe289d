"""The invisible FLUX.2 watermark: round trips through PNG and JPEG q90, unmarked images, sizes."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from flux2_core.errors import InputError
from flux2_core.safety import (
    BFL_REFERENCE_BITS,
    WATERMARK_BITS,
    OutputOptions,
    embed_watermark,
    encode_output,
    read_watermark,
)
from flux2_core.safety.watermark import WATERMARK_MESSAGE


def _decode(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("RGB"))


def _bits_read(rgb: np.ndarray, n: int) -> list[int]:
    """The raw bits invisible-watermark's own decoder reads (independent of read_watermark's vote)."""
    from imwatermark import WatermarkDecoder

    return [
        int(b) for b in WatermarkDecoder("bits", n).decode(np.ascontiguousarray(rgb[:, :, ::-1]), "dwtDct")
    ]


def test_message_is_the_48_digit_constant_and_bfl_drops_two_leading_zeros():
    assert len(WATERMARK_BITS) == 48 and WATERMARK_BITS[:2] == (0, 0)
    assert int("".join(map(str, WATERMARK_BITS)), 2) == WATERMARK_MESSAGE
    assert len(BFL_REFERENCE_BITS) == 46 and BFL_REFERENCE_BITS == WATERMARK_BITS[2:]


@pytest.mark.parametrize("fmt", ["png", "jpeg"])
@pytest.mark.parametrize("seed", [0, 1])
def test_round_trip_from_png_and_jpeg_q90(picture, fmt, seed):
    rgb = picture(512, 640, seed)
    data = encode_output(rgb, OutputOptions(format=fmt, jpeg_quality=90, watermark=True), "x")
    back = _decode(data)
    assert _bits_read(back, 48) == list(WATERMARK_BITS)  # every bit back, from the saved file
    reading = read_watermark(back)
    assert reading.found and reading.layout == "flux2local-48" and reading.matching_bits == 48
    # the mark is in the pixels, and it is faint
    diff = back.astype(np.float64) - rgb
    psnr = 10 * np.log10(255**2 / np.mean(diff**2))
    assert 28 < psnr < 60, psnr


def test_smallest_markable_size_is_still_found(picture):
    for seed in range(3):
        rgb = picture(256, 256, seed)
        for fmt in ("png", "jpeg"):
            back = _decode(encode_output(rgb, OutputOptions(format=fmt, watermark=True), "x"))
            reading = read_watermark(back)
            assert reading.found, (seed, fmt, reading)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_unmarked_images_read_as_unmarked(picture, seed):
    rgb = picture(512, 512, 10 + seed)
    for data in (
        encode_output(rgb, OutputOptions(format="png"), "x"),
        encode_output(rgb, OutputOptions(format="jpeg"), "x"),
    ):
        reading = read_watermark(_decode(data))
        assert not reading.found and reading.layout is None
        assert reading.matching_bits < 42  # chance agreement, about half of the bits
        assert "no watermark" in reading.summary()


def test_bfl_reference_layout_is_recognised(picture):
    rgb = picture(512, 512, 5)
    marked = embed_watermark(rgb, BFL_REFERENCE_BITS)
    reading = read_watermark(_decode(encode_output(marked, OutputOptions(format="png"), "x")))
    assert reading.found and reading.layout == "bfl-46" and reading.total_bits == 46


def test_default_chroma_subsampling_erases_the_mark(picture):
    """Why JPEGs are saved with subsampling=0: PIL's default 4:2:0 halves the chroma the mark lives in."""
    marked = embed_watermark(picture(512, 512, 2))
    buf = io.BytesIO()
    Image.fromarray(marked).save(buf, "JPEG", quality=90)  # PIL's default subsampling (4:2:0)
    assert not read_watermark(_decode(buf.getvalue())).found
    kept = encode_output(marked, OutputOptions(format="jpeg", jpeg_quality=90), "x")  # 4:4:4
    assert read_watermark(_decode(kept)).found
    with Image.open(io.BytesIO(kept)) as im:
        assert im.layer[0][1:3] == im.layer[1][1:3]  # same sampling factors for luma and chroma


def test_too_small_images(picture):
    small = picture(200, 300, 0)  # 60000 < 65536 pixels
    with pytest.raises(InputError, match=r"300x200.*at least 256x256"):
        embed_watermark(small)
    with pytest.raises(InputError, match="256x256"):
        encode_output(small, OutputOptions(watermark=True), "x")
    reading = read_watermark(small)
    assert not reading.found and reading.total_bits == 0 and "too small" in reading.summary()
    # the limit is the pixel count, as in the library: 128 x 512 can be marked
    wide = picture(128, 512, 0)
    assert read_watermark(embed_watermark(wide)).matching_bits >= 42


def test_bad_arrays_are_refused():
    with pytest.raises(InputError, match="uint8"):
        embed_watermark(np.zeros((300, 300, 3), np.float32))
    with pytest.raises(InputError, match=r"\(H, W, 3\)"):
        read_watermark(np.zeros((300, 300), np.uint8))
