"""End to end: references -> sampling -> VAE decode (``generate``)."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from torch import Tensor

from ..errors import InputError
from ..model.transformer import Flux2Transformer
from ..vae.model import Flux2VAE
from .references import DEFAULT_PIXEL_BUDGET, prepare_reference_latents
from .sampler import StepCallback, sample_latents
from .tokens import DOWNSCALE

logger = logging.getLogger(__name__)

DEFAULT_SIZE = 1024


def generate(
    *,
    transformer: Flux2Transformer,
    vae: Flux2VAE,
    prompt_embeds: Tensor,
    negative_prompt_embeds: Tensor | None = None,
    reference_images: Sequence[Tensor] | None = None,
    width: int | None = None,
    height: int | None = None,
    steps: int | None = None,
    guidance: float | None = None,
    seed: int = 0,
    noise: Tensor | None = None,
    init_image: Tensor | None = None,
    denoise: float = 1.0,
    callback: StepCallback | None = None,
    pixel_budget: int = DEFAULT_PIXEL_BUDGET,
    tile: str | int | None = "auto",
    device: torch.device | str | None = None,
) -> Tensor:
    """Generate images: prepare references, sample, decode.

    Args:
        transformer: a ``Flux2Transformer``.
        vae: a ``Flux2VAE``.
        prompt_embeds: (B, L, context_dim) text features.
        negative_prompt_embeds: unconditional features for base-model CFG (see ``sample_latents``).
        reference_images: None or up to 10 (3, H, W) tensors in [-1, 1] (editing / multi-reference).
        width, height: output size; None takes the first reference's fitted size, else 1024.
        steps, guidance, seed, noise, denoise, callback: see ``sample_latents``.
        init_image: (B or 1, 3, H, W) image in [-1, 1] for image-to-image (with ``denoise`` < 1).
        pixel_budget: maximum pixels per reference after resizing.
        tile: VAE tiling for encode and decode (None, "auto" or pixels).
        device: compute device (default: the device of ``prompt_embeds``).

    Returns:
        (B, 3, H, W) float32 images in [-1, 1].
    """
    refs = None
    if reference_images is not None and len(reference_images) > 0:
        refs = prepare_reference_latents(vae, reference_images, pixel_budget=pixel_budget, tile=tile)
        if width is None and height is None:
            height, width = refs[0].shape[2] * DOWNSCALE, refs[0].shape[3] * DOWNSCALE
    if init_image is not None and width is None and height is None:
        height, width = init_image.shape[-2], init_image.shape[-1]
    width = DEFAULT_SIZE if width is None else width
    height = DEFAULT_SIZE if height is None else height
    init_latents = None
    if init_image is not None:
        if init_image.ndim == 3:
            init_image = init_image[None]
        if tuple(init_image.shape[-2:]) != (height, width):
            raise InputError(
                f"init_image is {init_image.shape[-1]}x{init_image.shape[-2]} but the output "
                f"size is {width}x{height}. Fix: resize the image or set the size to match."
            )
        init_latents = vae.encode(init_image, tile=tile)
    latents = sample_latents(
        transformer=transformer,
        prompt_embeds=prompt_embeds,
        negative_prompt_embeds=negative_prompt_embeds,
        reference_latents=refs,
        width=width,
        height=height,
        steps=steps,
        guidance=guidance,
        seed=seed,
        noise=noise,
        init_latents=init_latents,
        denoise=denoise,
        callback=callback,
        device=device,
    )
    return vae.decode(latents, tile=tile).clamp(-1.0, 1.0)
