"""Prompt upsampling: the encoder's own language model rewrites a short prompt into a detailed one.

In the spirit of BFL's local upsampler: a system prompt for text-to-image (describe more, keep the
intent, quote any text that must appear in the image) or for editing (one short edit instruction,
optionally after looking at the reference images through Mistral's Pixtral vision tower), sampled
with a low temperature from a seeded generator. Qwen3 is text-only: images are ignored.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import InputError
from .spec import MISTRAL3, MISTRAL3_SPECIAL_IDS

logger = logging.getLogger(__name__)

SYSTEM_PROMPT_T2I = (
    "You turn short image requests into one rich prompt for a text-to-image model. Keep everything the "
    "user asked for and do not change their intent; add concrete detail about the subjects, their "
    "appearance and positions, the setting, lighting, colours, composition and style. Any words that "
    "must be visible in the image (signs, labels, captions) go in double quotes exactly as given. "
    "Answer with the prompt only, as plain prose, without lists, titles or remarks."
)
SYSTEM_PROMPT_I2I = (
    "You write editing instructions for an image-editing model that sees the reference image(s). Turn "
    "the user's request into a single clear instruction of about 50 to 80 words: say what to change, "
    "where, and what must stay the same, naming objects as they appear in the image. Put any text "
    "that must appear in double quotes. Answer with the instruction only."
)

# Pixtral preprocessing (the CLIP normalisation the vision tower was trained with).
_PIXEL_MEAN = (0.48145466, 0.4578275, 0.40821073)
_PIXEL_STD = (0.26862954, 0.26130258, 0.27577711)
_MAX_VLM_PIXELS = 768 * 768  # several references are joined side by side and capped to this area
_MAX_INPUT_TOKENS = 2048


def _to_chw(image) -> torch.Tensor:
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
            raise InputError(f"reference image batch of {t.shape[0]}: split it (see _split_batches).")
        t = t[0]
    if t.dim() != 3:
        raise InputError(f"reference image has shape {tuple(image.shape)}; expected (H, W, C) or (C, H, W).")
    if t.shape[-1] in (1, 3, 4) and t.shape[0] not in (1, 3, 4):
        t = t.permute(2, 0, 1)  # HWC -> CHW
    t = t.float() / 255.0 if not torch.is_floating_point(image) else t.float()
    if t.shape[0] == 1:
        t = t.expand(3, -1, -1)
    return t[:3].clamp(0, 1)


def _split_batches(images: Sequence | None) -> list:
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
        images: reference images (see ``_to_chw``).
        unit: pixels per image token side (patch size x spatial merge, 28 for Mistral Small 3.x).
        max_pixels: area cap.

    Returns:
        (3, H, W) with H and W multiples of ``unit``.
    """
    pic = _join_side_by_side([_to_chw(im) for im in images])
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


def build_upsample_inputs(
    encoder, prompt: str, images: Sequence | None = None, system: str | None = None
) -> tuple[list[int], torch.Tensor]:
    """Token ids and input embeddings of the upsampling chat.

    ``system`` replaces the upsampling system prompt (the content filter asks its own question).

    Returns:
        ``ids`` (list of L ints) and ``embeds`` (1, L, hidden) with image features placed at [IMG] tokens.
    """
    if not isinstance(prompt, str):
        raise InputError(f"the prompt to upsample is a {type(prompt).__name__}, not text.")
    images = [_to_chw(im) for im in _split_batches(images)]  # validates every image, even when text-only
    tok = encoder.tokenizer
    use_images = bool(images) and encoder.kind == MISTRAL3 and encoder.vision_tower is not None
    if images and not use_images:
        logger.warning(
            "prompt upsampling with %s looks at text only; %d reference image(s) ignored.",
            "Qwen3" if encoder.kind != MISTRAL3 else "this file (no vision tower)",
            len(images),
        )
    if system is None:
        system = SYSTEM_PROMPT_I2I if images else SYSTEM_PROMPT_T2I
    model = encoder.model
    if not use_images:
        ids = tok.chat_ids(system, prompt)
        ids = _limit(ids, tok)
        return ids, model.embed_tokens(torch.tensor([ids], device=encoder.device))
    cfg = encoder.vlm_config
    unit = cfg.vision_config.patch_size * cfg.spatial_merge_size
    pixels = prepare_vlm_image(images, unit).to(encoder.device, encoder.dtype)  # (3, H, W)
    h, w = pixels.shape[1:]
    ids = tok.chat_ids(system, prompt, image_token_grids=[(h // unit, w // unit)])
    ids = _limit(ids, tok)
    image_sizes = torch.tensor([[h, w]], device=encoder.device)
    vision_out = encoder.vision_tower(pixels[None], image_sizes=image_sizes, output_hidden_states=True)
    layer = cfg.vision_feature_layer if isinstance(cfg.vision_feature_layer, int) else -1
    feats = vision_out.hidden_states[layer]  # (1, h/14 * w/14, vision hidden)
    feats = encoder.multi_modal_projector(feats.squeeze(0), image_sizes)  # (h/28 * w/28, hidden)
    id_tensor = torch.tensor([ids], device=encoder.device)
    embeds = model.embed_tokens(id_tensor)
    slots = id_tensor[0] == MISTRAL3_SPECIAL_IDS["[IMG]"]
    if int(slots.sum()) != feats.shape[0]:
        raise InputError(
            f"the prompt is too long to fit the image tokens ({int(slots.sum())} of {feats.shape[0]} "
            "left); shorten the prompt."
        )
    embeds[0, slots] = feats.to(embeds.dtype)
    return ids, embeds


def _limit(ids: list[int], tok) -> list[int]:
    if len(ids) <= _MAX_INPUT_TOKENS:
        return ids
    logger.warning("upsampling input is %d tokens; keeping the first %d.", len(ids), _MAX_INPUT_TOKENS)
    return ids[: _MAX_INPUT_TOKENS - 1] + ids[-1:]


@torch.inference_mode()
def generate_ids(
    encoder, embeds: torch.Tensor, seed: int = 0, max_new_tokens: int = 512, temperature: float = 0.15
) -> list[int]:
    """Sample up to ``max_new_tokens`` token ids after ``embeds`` (1, L, hidden), stopping at end-of-turn.

    A KV cache keeps each step at one token; the seeded CPU generator makes the result depend only
    on the seed (not on global RNG state).
    """
    from transformers import DynamicCache

    if max_new_tokens < 1:
        raise InputError(f"max_new_tokens must be at least 1, got {max_new_tokens}.")
    if temperature < 0:
        raise InputError(f"temperature must be >= 0, got {temperature}.")
    model, head = encoder.model, encoder.lm_head
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    cache = DynamicCache(config=model.config)
    out = model(inputs_embeds=embeds, past_key_values=cache, use_cache=True)
    new: list[int] = []
    for _ in range(max_new_tokens):
        logits = head(out.last_hidden_state[:, -1]).float().cpu()[0]  # (vocab,)
        if temperature == 0:
            nxt = int(logits.argmax())
        else:
            nxt = int(torch.multinomial(torch.softmax(logits / temperature, dim=-1), 1, generator=gen))
        if nxt in encoder.tokenizer.eos_ids:
            break
        new.append(nxt)
        out = model(
            input_ids=torch.tensor([[nxt]], device=encoder.device), past_key_values=cache, use_cache=True
        )
    return new


@torch.inference_mode()
def upsample_prompt(
    encoder,
    prompt: str,
    images: Sequence | None = None,
    seed: int = 0,
    max_new_tokens: int = 512,
    temperature: float = 0.15,
) -> str:
    """Generate a rewritten prompt with ``encoder``'s language model. See ``Flux2TextEncoder.upsample``."""
    encoder.ensure_generation_ready()
    _, embeds = build_upsample_inputs(encoder, prompt, images)
    new = generate_ids(encoder, embeds, seed=seed, max_new_tokens=max_new_tokens, temperature=temperature)
    text = encoder.tokenizer.decode(new).strip()
    logger.info("upsampled prompt (%d tokens, seed %d): %s", len(new), seed, text[:200])
    return text
