"""The one thing the integrity check needs from a language model: next-token logits after a chat.

``ChatModel`` is that interface; ``EncoderChat`` implements it on the text encoder's
``TextGenerator`` (``Flux2TextEncoder.generator()``: all decoder layers, final norm, output head and,
for Mistral Small 3.x, the Pixtral vision tower), the same object prompt upsampling uses.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch

from ..errors import CheckpointError

HEAD_FIX = (
    "The content filter's VLM check needs the encoder's language-model head (like prompt upsampling): "
    "load the full model, e.g. the Hugging Face text_encoder/ folder of Mistral Small 3.x, or set "
    "vlm_check to off."
)


class ChatModel(Protocol):
    """A chat language model the integrity check can ask a question."""

    @property
    def sees_images(self) -> bool:
        """True if images can be part of the user message."""
        ...

    def token_ids(self, text: str) -> list[int]:
        """Token ids of plain text (no control tokens)."""
        ...

    def next_token_logits(self, system: str, user: str, images: Sequence | None = None) -> torch.Tensor:
        """Logits of the first answer token after a system + user chat.

        Args:
            system: the system prompt.
            user: the user message.
            images: images shown with the user message (only if ``sees_images``).

        Returns:
            (vocab,) float32 tensor on the CPU.
        """
        ...


class EncoderChat:
    """``ChatModel`` over a FLUX.2 text encoder's ``TextGenerator`` (Mistral Small 3.x, or Qwen3 for text).

    Args:
        model: a ``TextGenerator``, or a loaded ``Flux2TextEncoder`` whose generator is built here. A
            file without an output head (ComfyUI's Mistral files) raises ``CheckpointError`` saying
            what to load instead.
    """

    def __init__(self, model):
        if hasattr(model, "generator") and not hasattr(model, "next_token_logits"):
            try:
                model = model.generator()
            except CheckpointError as e:
                raise CheckpointError(e.path, e.problem, HEAD_FIX) from None
        self.generator = model

    @property
    def sees_images(self) -> bool:
        return self.generator.sees_images

    def token_ids(self, text: str) -> list[int]:
        return self.generator.tokenizer.text_ids(text)

    @torch.inference_mode()
    def next_token_logits(self, system: str, user: str, images: Sequence | None = None) -> torch.Tensor:
        return self.generator.next_token_logits(system, user, images)
