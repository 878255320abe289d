"""Pure-PyTorch FLUX.2: transformer, VAE, text encoders, schedule and sampler, checkpoint formats.

Never imports ComfyUI. Public names are re-exported here; see DEVELOPERS.md for the contracts.
"""

from .config import Flux2Config
from .errors import CheckpointError, Flux2Error, GenerationCancelled, InputError
from .inputs import check_finite, check_text
from .kv_cache import Flux2KVCache
from .lora import Flux2LoRA, apply_loras, load_lora
from .model.flops import BlockFlops, block_flops, tokens_for
from .model.transformer import Flux2Transformer
from .sampling import (
    DOWNSCALE,
    LATENT_CHANNELS,
    MAX_REFERENCES,
    SCHEDULERS,
    SOLVERS,
    SamplingPlan,
    StepInfo,
    check_latents,
    check_text_encoder,
    flux2_sigmas,
    generate,
    latent_shape,
    nearest_valid_size,
    plan_sampling,
    prepare_reference_latents,
    reference_token_count,
    sample_latents,
    schedule_sigmas,
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
    # per-block FLOPs for the streaming planner
    "BlockFlops",
    "block_flops",
    "tokens_for",
    # VAE, schedule, sampler
    "Flux2VAE",
    "Flux2VAEConfig",
    "SCHEDULERS",
    "SOLVERS",
    "StepInfo",
    "flux2_sigmas",
    "generate",
    "load_vae",
    "prepare_reference_latents",
    "sample_latents",
    "nearest_valid_size",
    "schedule_sigmas",
    "validate_size",
    # LoRAs
    "Flux2LoRA",
    "apply_loras",
    "load_lora",
    # run planning and input checks shared with the nodes
    "DOWNSCALE",
    "LATENT_CHANNELS",
    "MAX_REFERENCES",
    "SamplingPlan",
    "check_finite",
    "check_latents",
    "check_text",
    "check_text_encoder",
    "latent_shape",
    "plan_sampling",
    "reference_token_count",
    # text encoders
    "Flux2TextEncoder",
    "TextEncoderSpec",
    "load_text_encoder",
]
