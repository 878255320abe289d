"""Schedule, token packing, reference preparation, the Euler sampler and the pipeline."""

from .guidance import GuidancePlan, plan_guidance
from .pipeline import Flux2Pipeline, generate
from .references import fit_reference, prepare_reference_latents
from .sampler import StepInfo, make_noise, sample_latents
from .schedule import empirical_mu, flux2_sigmas
from .tokens import image_ids, pack, reference_tokens, text_ids, unpack, validate_size

__all__ = [
    "Flux2Pipeline",
    "GuidancePlan",
    "StepInfo",
    "empirical_mu",
    "fit_reference",
    "flux2_sigmas",
    "generate",
    "image_ids",
    "make_noise",
    "pack",
    "plan_guidance",
    "prepare_reference_latents",
    "reference_tokens",
    "sample_latents",
    "text_ids",
    "unpack",
    "validate_size",
]
