"""Our FLUX2LOCAL_CONDITIONING <-> ComfyUI's CONDITIONING (a list of [tensor (B, L, ctx), dict]).

What ComfyUI's FLUX.2 reads from a conditioning dict (comfy/model_base.py Flux and Flux2): the
embeddings, left-padded with zeros to 512 tokens when shorter; ``guidance`` ([dev]'s embedded scale,
3.5 when absent); ``reference_latents`` (packed VAE latents, ReferenceLatent appends to them) and
``reference_latents_method``; ``pooled_output`` must exist (None is fine). A conditioning that holds
only these can be sampled by our own sampler; anything else (several entries from Conditioning
Combine, areas, masks, timestep ranges, hooks) is left to ComfyUI's sampling.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..flux2_core.errors import InputError
from ..flux2_core.sampling.guidance import DEFAULT_GUIDANCE
from ..flux2_core.sampling.plan import MISTRAL3
from ..flux2_core.sampling.tokens import TEXT_TOKENS
from . import memory
from .types import Conditioning

# Keys our sampler reproduces exactly; "attention_mask" is ignored by ComfyUI's FLUX.2 unless
# "attention_mask_img_shape" is set too.
_SIMPLE_KEYS = {
    "pooled_output",
    "guidance",
    "reference_latents",
    "reference_latents_method",
    "attention_mask",
}


def _entry(embeds: torch.Tensor, extra: dict) -> list:
    return [embeds.to(memory.output_device(), torch.float32), extra]


def to_native(cond: Conditioning, negative: bool = False) -> list:
    """Our conditioning as ComfyUI's CONDITIONING (the prompt, or the negative prompt).

    [dev] (Mistral embeddings) gets ``guidance`` 4, BFL's default, so that samplers without
    FluxGuidance match FLUX.2 Sampler's default; FluxGuidance overrides it. Without a negative prompt
    the negative is zeros, as ComfyUI's ConditioningZeroOut gives.
    """
    extra: dict = {"pooled_output": None}
    if cond.encoder_kind == MISTRAL3:
        extra["guidance"] = DEFAULT_GUIDANCE
    if cond.reference_latents:
        extra["reference_latents"] = [
            r.to(memory.output_device(), torch.float32) for r in cond.reference_latents
        ]
    if not negative:
        return [_entry(cond.prompt_embeds, extra)]
    embeds = (
        cond.negative_embeds if cond.negative_embeds is not None else torch.zeros_like(cond.prompt_embeds)
    )
    return [_entry(embeds, extra)]


@dataclass(frozen=True)
class NativeTerms:
    """A one-entry native conditioning our sampler can run itself.

    Attributes:
        embeds: (B, >= 512, ctx), left-padded with zeros to 512 tokens as ComfyUI's FLUX.2 does.
        guidance: the entry's embedded guidance, or None.
        reference_latents: (1, 128, h, w) each.
    """

    embeds: torch.Tensor
    guidance: float | None
    reference_latents: tuple[torch.Tensor, ...]


def check_native(where: str, name: str, cond: object) -> list:
    """The CONDITIONING input, validated as a list of [tensor (B, L, ctx), dict]."""
    ok = (
        isinstance(cond, list)
        and cond
        and all(
            isinstance(c, list | tuple)
            and len(c) >= 2
            and isinstance(c[0], torch.Tensor)
            and c[0].ndim == 3
            and isinstance(c[1], dict)
            for c in cond
        )
    )
    if not ok:
        raise InputError(
            f"{where}: the '{name}' input must be a CONDITIONING (e.g. from CLIPTextEncode or FLUX.2 Encode "
            "Prompt's CONDITIONING output)."
        )
    return cond


def simple_terms(cond: list) -> NativeTerms | None:
    """The conditioning as ``NativeTerms`` if our sampler reproduces it exactly, else None."""
    if len(cond) != 1:
        return None
    embeds, extra = cond[0][0], cond[0][1]
    if set(extra) - _SIMPLE_KEYS or "attention_mask_img_shape" in extra:
        return None
    if extra.get("reference_latents_method") not in (None, "index"):
        return None
    refs = list(extra.get("reference_latents") or [])
    # A batch of latents in one entry is one reference per image of the sampled batch (ComfyUI's
    # Flux repeats it to the batch): left to ComfyUI's sampling.
    if any(r.ndim != 4 or r.shape[0] != 1 or r.shape[1] != 128 for r in refs):
        return None
    if embeds.shape[1] < TEXT_TOKENS:
        embeds = torch.nn.functional.pad(embeds, (0, 0, TEXT_TOKENS - embeds.shape[1], 0))
    guidance = extra.get("guidance")
    return NativeTerms(
        embeds=embeds.to(memory.offload_device()),
        guidance=None if guidance is None else float(guidance),
        reference_latents=tuple(r.to(memory.offload_device(), torch.float32) for r in refs),
    )


def from_terms(where: str, terms: NativeTerms, negative: NativeTerms | None, config, guidance: float):
    """A native conditioning as our ``Conditioning`` for ``config``'s model, and the guidance to use.

    Guidance 0 ("the default") takes the entry's embedded guidance (FluxGuidance) for [dev].

    Raises:
        InputError: CFG runs (base [klein], guidance > 1) but no negative CONDITIONING is connected.
    """
    from ..flux2_core.sampling import plan_guidance
    from ..flux2_core.sampling.plan import text_encoder_kind

    if not guidance and terms.guidance is not None and config.guidance_embed:
        guidance = terms.guidance
    plan = plan_guidance(config, guidance or None)
    if plan.mode == "cfg" and negative is None:
        raise InputError(
            f"{where}: FLUX.2 {config.variant} runs true CFG (guidance {plan.scale:g}) and needs a negative "
            "prompt: connect a CONDITIONING to 'negative' (e.g. CLIPTextEncode of an empty prompt), or set "
            "guidance to 1."
        )
    cond = Conditioning(
        prompt_embeds=terms.embeds,
        negative_embeds=None if negative is None else negative.embeds,
        context_dim=int(terms.embeds.shape[-1]),
        encoder_kind=text_encoder_kind(config),  # a native CLIP does not say which: only the width is checked
        encoder_file="the CONDITIONING input",
        reference_latents=terms.reference_latents,
    )
    return cond, guidance
