"""Prompt upsampling: the encoder's own language model rewrites a short prompt into a detailed one.

In the spirit of BFL's local upsampler: a system prompt for text-to-image (describe more, keep the
intent, quote any text that must appear in the image) or for editing (one short edit instruction,
optionally after looking at the reference images through Mistral's Pixtral vision tower), sampled
with a low temperature from a seeded generator. Qwen3 is text-only: images are ignored.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from .vlm_images import split_batches

if TYPE_CHECKING:
    from .generator import TextGenerator

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


def system_prompt(images: Sequence | None) -> str:
    """The upsampling system prompt: an edit instruction when reference images are given."""
    return SYSTEM_PROMPT_I2I if split_batches(images) else SYSTEM_PROMPT_T2I


@torch.inference_mode()
def upsample_prompt(
    generator: TextGenerator,
    prompt: str,
    images: Sequence | None = None,
    seed: int = 0,
    max_new_tokens: int = 512,
    temperature: float = 0.15,
) -> str:
    """Generate a rewritten prompt with ``generator``. See ``TextGenerator.upsample``."""
    text = generator.generate(
        system_prompt(images),
        prompt,
        images,
        seed=seed,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
    )
    logger.info("upsampled prompt (seed %d): %s", seed, text[:200])
    return text
