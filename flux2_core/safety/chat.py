"""The one thing the integrity check needs from a language model: next-token logits after a chat.

``ChatModel`` is that interface; ``EncoderChat`` implements it on a loaded ``Flux2TextEncoder``
with the parts prompt upsampling loads (all decoder layers, final norm, output head and, for
Mistral Small 3.x, the Pixtral vision tower), reusing the upsampler's chat and image embedding.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch

from ..errors import CheckpointError
from ..text_encoders.spec import MISTRAL3

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
    """``ChatModel`` over a loaded FLUX.2 text encoder (Mistral Small 3.x, or Qwen3 for text only).

    Loads what generation needs on first use (``ensure_generation_ready``); a file without an
    output head (ComfyUI's Mistral files) raises ``CheckpointError`` saying what to load instead.
    """

    def __init__(self, encoder):
        try:
            encoder.ensure_generation_ready()
        except CheckpointError as e:
            raise CheckpointError(e.path, e.problem, HEAD_FIX) from None
        if encoder.lm_head is None:
            raise CheckpointError(None, "the text encoder has no language-model head.", HEAD_FIX)
        self.encoder = encoder

    @property
    def sees_images(self) -> bool:
        return self.encoder.kind == MISTRAL3 and self.encoder.vision_tower is not None

    def token_ids(self, text: str) -> list[int]:
        return self.encoder.tokenizer.text_ids(text)

    @torch.inference_mode()
    def next_token_logits(self, system: str, user: str, images: Sequence | None = None) -> torch.Tensor:
        from ..text_encoders.upsample import build_upsample_inputs

        _, embeds = build_upsample_inputs(self.encoder, user, images, system=system)  # (1, L, hidden)
        out = self.encoder.model(inputs_embeds=embeds, use_cache=False)  # all layers + final norm
        return self.encoder.lm_head(out.last_hidden_state[:, -1]).float().cpu()[0]  # (vocab,)
