"""Pictures for Mistral Small 3.x's Pixtral vision tower: any image type in, one normalised tensor out.

Several images are joined side by side on a white canvas (top-aligned), scaled to at most
768 x 768 pixels of area with sides that are multiples of the vision tower's token size
(patch 14 x spatial merge 2 = 28), and normalised with the CLIP statistics Pixtral was trained with.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import InputError

# Pixtral preprocessing (the CLIP normalisation the vision tower was trained with).
_PIXEL_MEAN = (0.48145466, 0.4578275, 0.40821073)
_PIXEL_STD = (0.26862954, 0.26130258, 0.27577711)
_MAX_VLM_PIXELS = 768 * 768  # several images are joined side by side and capped to this area


def to_chw(image) -> torch.Tensor:
    """A PIL image, HWC array (uint8 or [0, 1] float), ComfyUI IMAGE (1, H, W, C) or CHW tensor -> (3, H, W)."""
    if hasattr(image, "convert") and hasattr(image, "size"):  # PIL
        image = np.asarray(image.convert("RGB"))
    if isinstance(image, np.ndarray):
        image = torch.from_numpy(np.ascontiguousarray(image))
    if not isinstance(image, torch.Tensor):
        raise InputError(f"reference image of type {type(image).__name__} is not an image or tensor.")
    t = image.detach().cpu()
    if t.dim() == 4:
        if t.shape[0] != 1:
            raise InputError(f"reference image batch of {t.shape[0]}: split it (see split_batches).")
        t = t[0]
    if t.dim() != 3:
        raise InputError(f"reference image has shape {tuple(image.shape)}; expected (H, W, C) or (C, H, W).")
    if t.shape[-1] in (1, 3, 4) and t.shape[0] not in (1, 3, 4):
        t = t.permute(2, 0, 1)  # HWC -> CHW
    t = t.float() / 255.0 if not torch.is_floating_point(image) else t.float()
    if t.shape[0] == 1:
        t = t.expand(3, -1, -1)
    return t[:3].clamp(0, 1)


def split_batches(images: Sequence | None) -> list:
    """A list of images where a (B, H, W, C) batch (ComfyUI IMAGE) counts as B images."""
    out = []
    for im in images or []:
        if isinstance(im, (torch.Tensor, np.ndarray)) and im.ndim == 4:
            out.extend(im[i : i + 1] for i in range(im.shape[0]))
        else:
            out.append(im)
    return out


def _join_side_by_side(images: list[torch.Tensor]) -> torch.Tensor:
    """Concatenate images horizontally on a white canvas, top-aligned. (3, H, W) each -> (3, maxH, sumW)."""
    height = max(im.shape[1] for im in images)
    canvas = torch.ones(3, height, sum(im.shape[2] for im in images))
    x = 0
    for im in images:
        canvas[:, : im.shape[1], x : x + im.shape[2]] = im
        x += im.shape[2]
    return canvas


def prepare_vlm_image(images: Sequence, unit: int, max_pixels: int = _MAX_VLM_PIXELS) -> torch.Tensor:
    """One normalised picture for the vision tower.

    Args:
        images: reference images (see ``to_chw``).
        unit: pixels per image token side (patch size x spatial merge, 28 for Mistral Small 3.x).
        max_pixels: area cap.

    Returns:
        (3, H, W) with H and W multiples of ``unit``.
    """
    pic = _join_side_by_side([to_chw(im) for im in images])
    _, h, w = pic.shape
    scale = min(1.0, math.sqrt(max_pixels / (h * w)))
    new_h = max(unit, round(h * scale / unit) * unit)
    new_w = max(unit, round(w * scale / unit) * unit)
    pic = F.interpolate(pic[None], size=(new_h, new_w), mode="bicubic", align_corners=False, antialias=True)[
        0
    ]
    mean = torch.tensor(_PIXEL_MEAN).view(3, 1, 1)
    std = torch.tensor(_PIXEL_STD).view(3, 1, 1)
    return (pic.clamp(0, 1) - mean) / std
