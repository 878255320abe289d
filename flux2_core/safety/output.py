"""Encoding an output image as a file: PNG text chunks, optional watermark and C2PA manifest.

The order matters: the watermark changes pixels, so it comes before encoding; the C2PA manifest
hashes the encoded file, so signing comes last (a later change to the file invalidates it).
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import InputError
from .provenance import SigningCredentials, sign_image
from .watermark import embed_watermark

FORMATS = ("png", "jpeg")


def tensor_to_rgb(image: torch.Tensor) -> np.ndarray:
    """One ComfyUI IMAGE (H, W, 3) float in [0, 1] -> (H, W, 3) uint8.

    Scales by 255 and truncates, as ComfyUI's SaveImage does, so the saved pixels are the same.
    """
    if image.dim() != 3 or image.shape[-1] != 3:
        raise InputError(f"expected one (H, W, 3) image, got shape {tuple(image.shape)}.")
    return np.clip(255.0 * image.detach().float().cpu().numpy(), 0, 255).astype(np.uint8)


@dataclass(frozen=True)
class OutputOptions:
    """How to write an image file.

    Attributes:
        format: "png" or "jpeg".
        jpeg_quality: JPEG quality (1-100); JPEGs are written with 4:4:4 chroma (``subsampling=0``),
            which keeps the watermark (4:2:0 erases it).
        png_compress_level: zlib level for PNG (ComfyUI's SaveImage uses 4).
        text: PNG text chunks (ComfyUI writes "prompt" and "workflow" as JSON); ignored for JPEG.
        watermark: embed the invisible FLUX.2 watermark.
        credentials: sign a C2PA manifest with these, or None.
        variant: the FLUX.2 variant named in the manifest.
    """

    format: str = "png"
    jpeg_quality: int = 90
    png_compress_level: int = 4
    text: dict[str, str] | None = None
    watermark: bool = False
    credentials: SigningCredentials | None = None
    variant: str | None = None


def encode_output(rgb: np.ndarray, options: OutputOptions, title: str) -> bytes:
    """The bytes of one output file.

    Args:
        rgb: (H, W, 3) uint8 RGB.
        options: format, metadata, watermark and signing choices.
        title: the file name (written into the C2PA manifest).

    Returns:
        The encoded file, marked and signed as asked.
    """
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    if options.format not in FORMATS:
        raise InputError(f"format '{options.format}' is not one of {', '.join(FORMATS)}.")
    if options.watermark:
        rgb = embed_watermark(rgb)
    pil = Image.fromarray(rgb)
    buf = io.BytesIO()
    if options.format == "png":
        info = None
        if options.text:
            info = PngInfo()
            for key, value in options.text.items():
                info.add_text(key, value)
        pil.save(buf, "PNG", pnginfo=info, compress_level=options.png_compress_level)
    else:
        pil.save(buf, "JPEG", quality=int(options.jpeg_quality), subsampling=0)
    data = buf.getvalue()
    if options.credentials is not None:
        data = sign_image(data, options.credentials, options.variant, title)
    return data
