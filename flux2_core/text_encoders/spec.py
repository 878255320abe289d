"""What FLUX.2 takes from each text encoder: layers, sequence length, padding, and model presets.

FLUX.2 conditions on the hidden states of three decoder layers of a language model, concatenated
per token: [dev] uses Mistral Small 3.x (layers 10/20/30 of 40, width 3 x 5120 = 15360), [klein]
uses Qwen3 4B / 8B (layers 9/18/27 of 36, width 3 x 2560 = 7680 or 3 x 4096 = 12288). Layer n here
means the output of decoder layer n counted from 1, i.e. ``hidden_states[n]`` of transformers.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

MISTRAL3 = "mistral3"
QWEN3 = "qwen3"

# Fixed [dev] system prompt; note the single line break after "object" (BFL, diffusers, ComfyUI).
MISTRAL3_SYSTEM_PROMPT = (
    "You are an AI that reasons about image descriptions. You give structured responses focusing on "
    "object relationships, object\nattribution and actions without speculation."
)

# Mistral "tekken" control-token ids of the Small 3.x tokenizers (also ComfyUI's start 1 / pad 11).
MISTRAL3_SPECIAL_IDS = {
    "<unk>": 0,
    "<s>": 1,
    "</s>": 2,
    "[INST]": 3,
    "[/INST]": 4,
    "[IMG]": 10,
    "<pad>": 11,
    "[IMG_BREAK]": 12,
    "[IMG_END]": 13,
    "[SYSTEM_PROMPT]": 17,
    "[/SYSTEM_PROMPT]": 18,
}

# [klein] prompt template: Qwen3 chat template with one user turn, thinking disabled.
QWEN3_TEMPLATE = "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
QWEN3_PAD_ID = 151643  # <|endoftext|>


@dataclass(frozen=True)
class TextEncoderSpec:
    """How FLUX.2 uses one family of text encoders.

    Attributes:
        kind: ``"mistral3"`` or ``"qwen3"``.
        hidden_layers: decoder layers (counted from 1) whose outputs are stacked.
        max_length: tokens per prompt after padding/truncation.
        pad_id: padding token id.
        pad_left: pad on the left ([dev]) or the right ([klein]).
    """

    kind: str
    hidden_layers: tuple[int, ...]
    max_length: int = 512
    pad_id: int = 0
    pad_left: bool = False

    def __post_init__(self) -> None:
        if self.kind not in (MISTRAL3, QWEN3):
            raise ValueError(f"unknown text encoder kind {self.kind!r}")
        if not self.hidden_layers or min(self.hidden_layers) < 1:
            raise ValueError(f"hidden_layers must be >= 1, got {self.hidden_layers}")

    @property
    def layers_needed(self) -> int:
        """Decoder layers that must run (the deepest stacked layer); later ones are skipped."""
        return max(self.hidden_layers)

    def context_dim(self, hidden_size: int) -> int:
        return hidden_size * len(self.hidden_layers)

    @classmethod
    def for_kind(cls, kind: str) -> TextEncoderSpec:
        """The published FLUX.2 settings for ``kind``."""
        if kind not in _SPECS:
            raise ValueError(f"unknown text encoder kind {kind!r}; expected one of {sorted(_SPECS)}")
        return _SPECS[kind]

    def replace(self, **changes) -> TextEncoderSpec:
        return dataclasses.replace(self, **changes)


_SPECS = {
    MISTRAL3: TextEncoderSpec(MISTRAL3, (10, 20, 30), 512, MISTRAL3_SPECIAL_IDS["<pad>"], pad_left=True),
    QWEN3: TextEncoderSpec(QWEN3, (9, 18, 27), 512, QWEN3_PAD_ID, pad_left=False),
}


@dataclass(frozen=True)
class DecoderShape:
    """Architecture numbers of a decoder-only language model, as published or read from shapes.

    Attributes mirror the transformers config fields of the same names.
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rope_theta: float
    rms_norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool = False


# Published configs of the real encoders (Hugging Face config.json of each model).
DECODER_PRESETS: dict[str, DecoderShape] = {
    "mistral-small-3.2-24b": DecoderShape(131072, 5120, 32768, 40, 32, 8, 128, 1e9, 1e-5, 131072),
    "qwen3-4b": DecoderShape(151936, 2560, 9728, 36, 32, 8, 128, 1e6, 1e-6, 40960, tie_word_embeddings=True),
    "qwen3-8b": DecoderShape(151936, 4096, 12288, 36, 32, 8, 128, 1e6, 1e-6, 40960),
}
