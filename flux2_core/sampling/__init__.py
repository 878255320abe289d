"""Schedules, token packing, reference preparation, run planning, the sampler and its solvers."""

from .guidance import GuidancePlan, plan_guidance
from .pipeline import generate
from .plan import (
    SamplingPlan,
    activation_bytes,
    check_text_encoder,
    plan_sampling,
    reference_token_count,
    text_encoder_kind,
)
from .references import fit_reference, prepare_reference_latents
from .sampler import StepInfo, make_noise, sample_latents
from .schedule import SCHEDULERS, empirical_mu, flux2_sigmas, schedule_sigmas, simple_sigmas
from .solvers import SOLVERS, make_solver
from .tokens import (
    DOWNSCALE,
    LATENT_CHANNELS,
    MAX_PIXELS,
    MAX_REFERENCES,
    MAX_SIDE,
    MIN_SIDE,
    check_latents,
    image_ids,
    latent_shape,
    nearest_valid_size,
    pack,
    reference_tokens,
    text_ids,
    unpack,
    validate_size,
)

__all__ = [
    "DOWNSCALE",
    "LATENT_CHANNELS",
    "MAX_PIXELS",
    "MAX_REFERENCES",
    "MAX_SIDE",
    "MIN_SIDE",
    "SCHEDULERS",
    "SOLVERS",
    "GuidancePlan",
    "SamplingPlan",
    "StepInfo",
    "activation_bytes",
    "check_latents",
    "check_text_encoder",
    "empirical_mu",
    "fit_reference",
    "flux2_sigmas",
    "generate",
    "image_ids",
    "latent_shape",
    "make_noise",
    "make_solver",
    "nearest_valid_size",
    "pack",
    "plan_guidance",
    "plan_sampling",
    "prepare_reference_latents",
    "reference_token_count",
    "reference_tokens",
    "sample_latents",
    "schedule_sigmas",
    "simple_sigmas",
    "text_encoder_kind",
    "text_ids",
    "unpack",
    "validate_size",
]
