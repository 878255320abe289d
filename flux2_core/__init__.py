"""Pure-PyTorch FLUX.2: transformer, VAE, text encoders, schedule and sampler, checkpoint formats.

Never imports ComfyUI. Public names are re-exported here; see DEVELOPERS.md for the contracts.
"""

from .errors import CheckpointError, Flux2Error, GenerationCancelled, InputError

__all__ = ["CheckpointError", "Flux2Error", "GenerationCancelled", "InputError"]
