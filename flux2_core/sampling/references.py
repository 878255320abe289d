"""Reference (editing / multi-reference) image preparation: resize to a pixel budget, crop to
multiples of 16, VAE-encode to normalised packed latents.

Follows diffusers' FLUX.2 pipelines: each reference larger than the budget (default 1024^2 pixels)
is scaled down keeping its aspect ratio, then each side is floored to a multiple of 16 by a centre
crop. Smaller references are never upscaled. Resizing uses antialiased bicubic interpolation (the
reference implementations use PIL LANCZOS on 8-bit images; the difference is sub-quantisation).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor

from ..errors import InputError
from .tokens import DOWNSCALE, MAX_REFERENCES

logger = logging.getLogger(__name__)

DEFAULT_PIXEL_BUDGET = 1024 * 1024
MIN_REF_SIDE = 64
MAX_REF_ASPECT = 8.0


def _as_list(images: Tensor | Sequence[Tensor]) -> list[Tensor]:
    if isinstance(images, Tensor):
        if images.ndim == 3:
            return [images]
        if images.ndim == 4:
            return list(images)
        raise InputError(f"reference images must be (3, H, W) or (N, 3, H, W), got {tuple(images.shape)}.")
    out = []
    for i, img in enumerate(images):
        if not isinstance(img, Tensor):
            raise InputError(
                f"reference image {i} is a {type(img).__name__}; expected a (3, H, W) tensor in [-1, 1]."
            )
        out.append(img[0] if img.ndim == 4 and img.shape[0] == 1 else img)
    return out


def fit_reference(image: Tensor, pixel_budget: int = DEFAULT_PIXEL_BUDGET, index: int = 0) -> Tensor:
    """Resize/crop one reference image (3, H, W) in [-1, 1] for encoding.

    Args:
        image: (3, H, W) float image in [-1, 1].
        pixel_budget: maximum H*W after resizing (aspect ratio kept).
        index: position in the reference list, for error messages.

    Returns:
        (3, H', W') with H', W' multiples of 16 and H'*W' <= pixel_budget.
    """
    if image.ndim != 3 or image.shape[0] != 3:
        raise InputError(f"reference image {index} has shape {tuple(image.shape)}; expected (3, H, W) RGB.")
    _, h, w = image.shape
    if min(h, w) < MIN_REF_SIDE:
        raise InputError(
            f"reference image {index} is {w}x{h}; both sides must be at least {MIN_REF_SIDE} "
            "pixels. Fix: use a larger image."
        )
    if max(h / w, w / h) > MAX_REF_ASPECT:
        raise InputError(
            f"reference image {index} is {w}x{h}, an aspect ratio beyond {MAX_REF_ASPECT:g}:1. "
            "Fix: crop it to a less extreme shape."
        )
    image = image.float()
    if h * w > pixel_budget:
        scale = math.sqrt(pixel_budget / (h * w))
        nh, nw = max(DOWNSCALE, int(h * scale)), max(DOWNSCALE, int(w * scale))
        image = F.interpolate(
            image[None], size=(nh, nw), mode="bicubic", antialias=True, align_corners=False
        )[0]
        logger.debug("reference %d resized %dx%d -> %dx%d", index, w, h, nw, nh)
        h, w = nh, nw
    ch, cw = h // DOWNSCALE * DOWNSCALE, w // DOWNSCALE * DOWNSCALE
    top, left = (h - ch) // 2, (w - cw) // 2
    return image[:, top : top + ch, left : left + cw].clamp(-1.0, 1.0)


def prepare_reference_latents(
    vae, images: Tensor | Sequence[Tensor], pixel_budget: int = DEFAULT_PIXEL_BUDGET, tile="auto"
) -> list[Tensor]:
    """Fit and encode reference images.

    Args:
        vae: a ``Flux2VAE``.
        images: a list of (3, H, W) tensors (or one (N, 3, H, W) batch) in [-1, 1]; at most 10.
        pixel_budget: maximum pixels per reference after resizing (default 1024x1024).
        tile: VAE tiling (see ``Flux2VAE.encode``).

    Returns:
        One (1, 128, h, w) float32 latent per reference, on the VAE's device.

    Raises:
        InputError: more than 10 references, or a reference too small / too elongated.
    """
    refs = _as_list(images)
    if len(refs) > MAX_REFERENCES:
        raise InputError(
            f"{len(refs)} reference images given; at most {MAX_REFERENCES} are supported. "
            "Fix: remove some reference images."
        )
    out = []
    for i, img in enumerate(refs):
        fitted = fit_reference(img, pixel_budget, i)
        out.append(vae.encode(fitted[None], tile=tile))
    return out
