"""The pack's own socket types and the payloads they carry between Flux2Local nodes.

IMAGE, LATENT and STRING stay ComfyUI's own types so that LoadImage, SaveImage, upscalers and the
like work with the pack; the model, text encoder, VAE and conditioning are ours because they are
not ComfyUI's MODEL/CLIP/VAE/CONDITIONING objects.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
from comfy_api.latest import io

Flux2Model = io.Custom("FLUX2LOCAL_MODEL")
Flux2TextEncoder = io.Custom("FLUX2LOCAL_TEXT_ENCODER")
Flux2Vae = io.Custom("FLUX2LOCAL_VAE")
Flux2Conditioning = io.Custom("FLUX2LOCAL_CONDITIONING")

CATEGORY = "FLUX.2"


@dataclass(frozen=True)
class Conditioning:
    """What the sampler needs besides the model: prompt embeddings and reference latents.

    Attributes:
        prompt_embeds: (B, 512, context_dim) on the offload device (CPU).
        negative_embeds: (B, 512, context_dim) for CFG (base models), or None.
        reference_latents: normalised packed VAE latents, each (1, 128, h, w).
        context_dim: the text encoder's output width; must match the transformer's.
        encoder_kind: "mistral3" or "qwen3".
        encoder_file: the text encoder's file (or folder), named when it does not fit the model.
        prompt: the prompt text that was encoded (after upsampling, if any).
    """

    prompt_embeds: torch.Tensor
    negative_embeds: torch.Tensor | None
    context_dim: int
    encoder_kind: str
    encoder_file: str = ""
    prompt: str = ""
    reference_latents: tuple[torch.Tensor, ...] = field(default_factory=tuple)

    def with_references(self, latents: list[torch.Tensor]) -> Conditioning:
        # A new object: ComfyUI caches node outputs, so an upstream conditioning must never change.
        return replace(self, reference_latents=tuple(self.reference_latents) + tuple(latents))
