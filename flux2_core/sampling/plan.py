"""What a FLUX.2 run is, decided from the transformer's config before any transformer work.

The one home of the variant rules that the library and the ComfyUI nodes share: default steps and
guidance and whether true CFG runs (``plan_guidance``), which text encoder a model reads
(family and width), the sequence length and per-block work the streaming planner is given, and
the activation estimate kept free when weights are budgeted.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from torch import Tensor

from ..config import Flux2Config
from ..errors import InputError
from ..model.flops import block_flops, tokens_for
from .guidance import GuidancePlan, plan_guidance
from .tokens import TEXT_TOKENS, validate_size

# Text-encoder family per model family: [dev] (the one with a guidance embedder) reads Mistral
# Small 3.x, every [klein] reads Qwen3 (BFL's model cards).
MISTRAL3, QWEN3 = "mistral3", "qwen3"
_ENCODER_NAMES = {MISTRAL3: "Mistral Small 3.x", QWEN3: "Qwen3"}
_ENCODER_ADVICE = "Mistral Small 3.x for [dev], Qwen3 4B for [klein] 4B, Qwen3 8B for [klein] 9B"

# A block holds about 24 x hidden values per token at its peak (qkv 3H, SwiGLU 6H in + 3H out,
# attention output, residuals and modulated copies), in a 2-byte compute dtype.
_ACTIVATION_VALUES_PER_TOKEN_AND_HIDDEN = 24
_ACTIVATION_BYTES = 2


def text_encoder_kind(config: Flux2Config) -> str:
    """The text-encoder family ("mistral3" or "qwen3") a transformer was trained with."""
    return MISTRAL3 if config.guidance_embed else QWEN3


def check_text_encoder(
    config: Flux2Config,
    context_dim: int,
    encoder_kind: str,
    model_name: str = "the transformer",
    encoder_name: str = "the text encoder",
) -> None:
    """Refuse prompt embeddings from an encoder the transformer was not trained with.

    Args:
        config: the transformer's config.
        context_dim: width of the embeddings (3 x the encoder's hidden size).
        encoder_kind: "mistral3" or "qwen3".
        model_name: the transformer's file, for the message.
        encoder_name: the text encoder's file, for the message.

    Raises:
        InputError: the width or the family differs; the message names both files.
    """
    expected = text_encoder_kind(config)
    if context_dim == config.context_dim and encoder_kind == expected:
        return
    raise InputError(
        f"the text encoder {encoder_name} ({_ENCODER_NAMES.get(encoder_kind, encoder_kind)}, text width "
        f"{context_dim}) does not belong to the model {model_name} (FLUX.2 {config.variant}, which reads "
        f"{_ENCODER_NAMES[expected]} embeddings of width {config.context_dim}). Fix: load the matching "
        f"encoder: {_ENCODER_ADVICE}."
    )


def distilled_for_unknown(guidance: float | None) -> bool:
    """Whether to treat a [klein] model known only by its weights as step-distilled.

    The weights cannot tell distilled [klein] from base (only the file name can, which a native MODEL
    from another loader does not carry): a CFG scale above 1 says base, anything else distilled.
    """
    return guidance is None or guidance <= 1.0


def reference_token_count(reference_latents: Sequence[Tensor]) -> int:
    """Tokens the references add to the sequence: one per packed latent cell, (1, 128, h, w) each."""
    return sum(int(r.shape[-2]) * int(r.shape[-1]) for r in reference_latents)


def activation_bytes(config: Flux2Config, tokens: int) -> int:
    """Rough activation peak of one transformer block for ``tokens`` tokens, in bytes."""
    return tokens * config.hidden_size * _ACTIVATION_VALUES_PER_TOKEN_AND_HIDDEN * _ACTIVATION_BYTES


@dataclass(frozen=True)
class SamplingPlan:
    """A run's shape and work, for scheduling before it starts.

    Attributes:
        steps: denoising steps.
        guidance: how velocities are computed (embedded, none or CFG; the scale).
        tokens: sequence length of one pass (image + text + reference tokens).
        passes: transformer passes per step for the whole batch (CFG doubles them).
        block_flops: FLOPs of each streamable block for one step (all passes), in execution order.
        activation_bytes: activation peak of one block, to keep free beside the weights.
    """

    steps: int
    guidance: GuidancePlan
    tokens: int
    passes: int
    block_flops: tuple[float, ...]
    activation_bytes: int


def plan_sampling(
    config: Flux2Config,
    width: int,
    height: int,
    reference_tokens: int = 0,
    batch: int = 1,
    steps: int | None = None,
    guidance: float | None = None,
) -> SamplingPlan:
    """Decide steps and guidance and estimate the work of a run.

    Args:
        config: the transformer's config.
        width, height: output size in pixels (validated: multiples of 16, 64 .. 4 MP).
        reference_tokens: tokens of the reference latents (``reference_token_count``).
        batch: images sampled at once.
        steps: None for the variant's default (4 for distilled [klein], 50 otherwise).
        guidance: None for the variant's default (see ``plan_guidance``).

    Raises:
        InputError: bad size, steps or guidance.
    """
    validate_size(width, height)
    plan = plan_guidance(config, guidance)
    steps = plan.default_steps if steps is None else int(steps)
    if steps < 1:
        raise InputError(f"steps must be >= 1, got {steps}.")
    if batch < 1:
        raise InputError(f"batch must be >= 1, got {batch}.")
    tokens = tokens_for(width, height, text_tokens=TEXT_TOKENS, reference_tokens=reference_tokens)
    passes = batch * plan.passes
    per_block = block_flops(config, tokens).per_block
    return SamplingPlan(
        steps=steps,
        guidance=plan,
        tokens=tokens,
        passes=passes,
        block_flops=tuple(f * passes for f in per_block),
        activation_bytes=activation_bytes(config, tokens),
    )
