"""Latent <-> token packing and the 4-axis (t, h, w, l) position ids (as BFL's and ComfyUI's FLUX.2).

- text token i: (0, 0, 0, i)
- target latent cell (r, c): (0, r, c, 0), row-major
- reference k (0-based) cell (r, c): (10 + 10k, r, c, 0); each reference keeps its own grid
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..errors import InputError

# Time-axis spacing between references (BFL / ComfyUI "index" method, ref_index_scale 10).
REF_TIME_STEP = 10
MAX_REFERENCES = 10
LATENT_CHANNELS = 128
DOWNSCALE = 16  # pixels per packed latent cell
MIN_SIDE = 64
MAX_PIXELS = 4 * 1024 * 1024
# The longest side a valid size can have: 4 MP over the shortest side (64 x 65536).
MAX_SIDE = MAX_PIXELS // MIN_SIDE
TEXT_TOKENS = 512  # prompt embeddings are always padded or cut to 512 tokens


def check_latents(latents: object, where: str) -> tuple[int, int]:
    """Validate FLUX.2 packed latents (B, 128, H/16, W/16) and return their (width, height) in pixels.

    Raises:
        InputError: not a tensor, or another model's latent layout; the message names ``where``.
    """
    if not isinstance(latents, Tensor) or latents.ndim != 4 or latents.shape[1] != LATENT_CHANNELS:
        shape = tuple(latents.shape) if isinstance(latents, Tensor) else type(latents).__name__
        raise InputError(
            f"{where}: the latent has shape {shape}; FLUX.2 latents are (B, {LATENT_CHANNELS}, H/16, W/16). "
            "Fix: use FLUX.2 VAE Encode or EmptyFlux2LatentImage (other models' latents do not fit)."
        )
    return latents.shape[3] * DOWNSCALE, latents.shape[2] * DOWNSCALE


def latent_shape(width: int, height: int, batch: int = 1) -> tuple[int, int, int, int]:
    """(B, 128, H/16, W/16): the packed latent of an image of ``width`` x ``height`` pixels."""
    return (batch, LATENT_CHANNELS, height // DOWNSCALE, width // DOWNSCALE)


def validate_size(width: int, height: int) -> None:
    """Raise ``InputError`` unless width and height are multiples of 16 within [64, 4 MP].

    We refuse instead of silently rounding so that a workflow never produces a different size
    than asked for; the message suggests ``nearest_valid_size`` (itself valid, same aspect ratio).
    """
    problems = []
    if width % DOWNSCALE or height % DOWNSCALE:
        problems.append("width and height must be multiples of 16")
    if width < MIN_SIDE or height < MIN_SIDE:
        problems.append(f"each side must be at least {MIN_SIDE}")
    if width * height > MAX_PIXELS:
        problems.append(f"the image may have at most {MAX_PIXELS} pixels (4 MP, e.g. 2048x2048)")
    if problems:
        w, h = nearest_valid_size(width, height)
        raise InputError(
            f"Invalid output size {width}x{height}: {'; '.join(problems)}. "
            f"Fix: use e.g. {w}x{h} (about the same aspect ratio, multiples of 16, within 4 MP)."
        )


def nearest_valid_size(width: int, height: int) -> tuple[int, int]:
    """The valid size (multiples of 16, sides >= 64, at most 4 MP) closest in shape to ``width`` x ``height``.

    A valid size is returned unchanged. Otherwise the size is scaled down to 4 MP if it is larger
    (keeping the aspect ratio), each side is rounded down or up to a multiple of 16 (at least 64),
    and of the candidates within 4 MP the one with the closest aspect ratio wins (then the larger).
    E.g. 8192x8192 -> 2048x2048, 4096x1040 -> 4064x1024, 1000x1024 -> 1008x1024.
    """
    width, height = max(int(width), 1), max(int(height), 1)
    scale = min(1.0, math.sqrt(MAX_PIXELS / (width * height)))
    ideal_w, ideal_h = width * scale, height * scale

    def sides(ideal: float) -> set[int]:
        # A side that is already a multiple of 16 stays; others are rounded down and up.
        lo = math.floor(ideal / DOWNSCALE) * DOWNSCALE
        steps = (lo,) if ideal == lo else (lo, lo + DOWNSCALE)
        return {min(max(s, MIN_SIDE), MAX_SIDE) for s in steps}

    aspect = math.log(width / height)
    candidates = [(w, h) for w in sides(ideal_w) for h in sides(ideal_h) if w * h <= MAX_PIXELS]
    if (width, height) in candidates:
        return width, height
    if not candidates:  # a side clamped up to 64 pushed every pair over 4 MP: shorten the other one
        w, h = sorted(sides(ideal_w))[0], sorted(sides(ideal_h))[0]
        if w >= h:
            w = MAX_PIXELS // h // DOWNSCALE * DOWNSCALE
        else:
            h = MAX_PIXELS // w // DOWNSCALE * DOWNSCALE
        return w, h
    return min(candidates, key=lambda wh: (abs(math.log(wh[0] / wh[1]) - aspect), -wh[0] * wh[1]))


def pack(latents: Tensor) -> Tensor:
    """(B, C, h, w) -> tokens (B, h*w, C), row-major."""
    b, c, h, w = latents.shape
    return latents.reshape(b, c, h * w).transpose(1, 2)


def unpack(tokens: Tensor, height: int, width: int) -> Tensor:
    """tokens (B, h*w, C) in row-major order -> (B, C, h, w)."""
    b, n, c = tokens.shape
    if n != height * width:
        raise ValueError(f"unpack: {n} tokens do not fill a {height}x{width} grid.")
    return tokens.transpose(1, 2).reshape(b, c, height, width)


def text_ids(batch: int, length: int, device: torch.device | str = "cpu") -> Tensor:
    """(B, L, 4) ids (0, 0, 0, i)."""
    ids = torch.zeros(length, 4, dtype=torch.long, device=device)
    ids[:, 3] = torch.arange(length, device=device)
    return ids.unsqueeze(0).expand(batch, -1, -1)


def image_ids(
    height: int, width: int, t: int = 0, batch: int = 1, device: torch.device | str = "cpu"
) -> Tensor:
    """(B, h*w, 4) ids (t, r, c, 0) for an h x w latent grid in row-major order."""
    r = torch.arange(height, device=device).repeat_interleave(width)
    c = torch.arange(width, device=device).repeat(height)
    ids = torch.stack([torch.full_like(r, t), r, c, torch.zeros_like(r)], dim=-1)
    return ids.unsqueeze(0).expand(batch, -1, -1)


def reference_tokens(reference_latents: list[Tensor], batch: int) -> tuple[Tensor, Tensor]:
    """Pack references (each (1, 128, h_k, w_k)) into tokens (B, R, 128) and ids (B, R, 4).

    Reference k gets time coordinate 10 + 10k; its cells keep their own (r, c) grid from 0.
    """
    if len(reference_latents) > MAX_REFERENCES:
        raise InputError(
            f"{len(reference_latents)} reference images given; at most {MAX_REFERENCES} "
            "are supported. Fix: remove some reference images."
        )
    toks, ids = [], []
    for k, ref in enumerate(reference_latents):
        if ref.ndim != 4 or ref.shape[0] != 1 or ref.shape[1] != LATENT_CHANNELS:
            raise InputError(
                f"reference latent {k} has shape {tuple(ref.shape)}; expected "
                f"(1, {LATENT_CHANNELS}, h, w) from prepare_reference_latents."
            )
        toks.append(pack(ref))
        ids.append(image_ids(ref.shape[2], ref.shape[3], t=REF_TIME_STEP * (k + 1), device=ref.device))
    tokens = torch.cat(toks, dim=1).expand(batch, -1, -1)
    return tokens, torch.cat(ids, dim=1).expand(batch, -1, -1)
