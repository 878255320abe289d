"""The FLUX.2 autoencoder: model, checkpoint loading (BFL / ComfyUI / diffusers), tiled encode/decode."""

from .config import Flux2VAEConfig
from .loader import load_vae
from .model import Flux2VAE, patchify, unpatchify
from .tiling import activation_bytes

__all__ = ["Flux2VAE", "Flux2VAEConfig", "activation_bytes", "load_vae", "patchify", "unpatchify"]
