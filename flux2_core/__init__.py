"""Pure-PyTorch FLUX.2: transformer, VAE, text encoders, schedule and sampler, checkpoint formats.

Never imports ComfyUI. Public names are re-exported here; see DEVELOPERS.md for the contracts.
"""

from .config import Flux2Config
from .errors import CheckpointError, Flux2Error, GenerationCancelled, InputError
from .kv_cache import Flux2KVCache
from .lora import Flux2LoRA, apply_loras, load_lora
from .model.flops import BlockFlops, block_flops, tokens_for
from .model.transformer import Flux2Transformer
from .sampling import (
    Flux2Pipeline,
    StepInfo,
    flux2_sigmas,
    generate,
    prepare_reference_latents,
    sample_latents,
    validate_size,
)
from .text_encoders import Flux2TextEncoder, TextEncoderSpec, load_text_encoder
from .transformer_loader import load_transformer
from .vae import Flux2VAE, Flux2VAEConfig, load_vae

__all__ = [
    "CheckpointError",
    "Flux2Config",
    "Flux2Error",
    "Flux2KVCache",
    "Flux2Transformer",
    "GenerationCancelled",
    "InputError",
    "load_transformer",
    # per-block FLOPs for the streaming planner (issue 6)
    "BlockFlops",
    "block_flops",
    "tokens_for",
    # VAE, schedule, sampler (issue 3)
    "Flux2Pipeline",
    "Flux2VAE",
    "Flux2VAEConfig",
    "StepInfo",
    "flux2_sigmas",
    "generate",
    "load_vae",
    "prepare_reference_latents",
    "sample_latents",
    "validate_size",
    # LoRAs
    "Flux2LoRA",
    "apply_loras",
    "load_lora",
    # text encoders (issue 4)
    "Flux2TextEncoder",
    "TextEncoderSpec",
    "load_text_encoder",
]
