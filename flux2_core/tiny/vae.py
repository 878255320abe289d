"""Tiny random FLUX.2 VAEs written in the real published layouts (BFL, ComfyUI, diffusers).

The tiny VAE keeps the real structure (4 levels, 16x packed latent, 32 z-channels, 32-group
GroupNorm) with widths 32/64/128/128 and one ResNet block per encoder level, so every loader and
model code path runs in milliseconds.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..vae.config import Flux2VAEConfig
from ..vae.keymap import bfl_to_diffusers_key, is_attention_projection
from ..vae.model import Flux2VAE

LAYOUTS = ("bfl", "comfyui", "diffusers")


def tiny_vae_state_dict(seed: int = 0, config: Flux2VAEConfig | None = None) -> dict[str, torch.Tensor]:
    """Random float32 weights in BFL naming.

    Norm affines and latent statistics are randomised too (not left at 1/0), so a loader that
    dropped or swapped them would be caught by the parity tests.
    """
    cfg = config or Flux2VAEConfig.from_name("tiny")
    gen = torch.Generator().manual_seed(seed)
    model = Flux2VAE(cfg)
    state = {}
    for name, t in model.state_dict().items():
        if name == "bn.running_mean":
            v = 0.5 * torch.randn(t.shape, generator=gen)
        elif name == "bn.running_var":
            v = 0.5 + 1.5 * torch.rand(t.shape, generator=gen)
        elif t.ndim == 1 and name.endswith(".weight"):  # GroupNorm scale
            v = 1.0 + 0.1 * torch.randn(t.shape, generator=gen)
        elif t.ndim == 1:  # biases
            v = 0.05 * torch.randn(t.shape, generator=gen)
        else:  # conv kernels, fan-in scaled so activations neither vanish nor explode
            fan_in = t[0].numel()
            v = torch.randn(t.shape, generator=gen) / fan_in**0.5
        state[name] = v.contiguous()
    return state


def _diffusers_config(cfg: Flux2VAEConfig) -> dict:
    n = cfg.num_levels
    return {
        "_class_name": "AutoencoderKLFlux2",
        "_diffusers_version": "0.42.1",
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": ["DownEncoderBlock2D"] * n,
        "up_block_types": ["UpDecoderBlock2D"] * n,
        "block_out_channels": list(cfg.encoder_widths),
        "decoder_block_out_channels": None
        if cfg.decoder_widths == cfg.encoder_widths
        else list(cfg.decoder_widths),
        "layers_per_block": cfg.num_res_blocks,
        "act_fn": "silu",
        "latent_channels": cfg.z_channels,
        "norm_num_groups": cfg.norm_groups,
        "sample_size": 1024,
        "use_quant_conv": True,
        "use_post_quant_conv": True,
        "mid_block_add_attention": True,
        "batch_norm_eps": cfg.bn_eps,
        "batch_norm_momentum": 0.1,
        "patch_size": [cfg.patch, cfg.patch],
    }


def write_tiny_vae(
    dest: str | os.PathLike,
    layout: str = "bfl",
    seed: int = 0,
    config: Flux2VAEConfig | None = None,
    dtype: torch.dtype = torch.float32,
) -> Path:
    """Write a tiny random FLUX.2 VAE.

    Args:
        dest: the ``.safetensors`` file for "bfl"/"comfyui"; the ``vae/`` folder for "diffusers"
            (``config.json`` + ``diffusion_pytorch_model.safetensors``).
        layout: "bfl" (``ae.safetensors`` names), "comfyui" (BFL names plus the
            ``bn.num_batches_tracked`` buffer ComfyUI's BatchNorm2d saves) or "diffusers".
        seed: weights seed; the same seed gives the same weights in every layout.
        config: architecture (default: the "tiny" preset).
        dtype: storage dtype of the parameters (latent statistics stay float32).

    Returns:
        The path written (file or folder).
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}.")
    cfg = config or Flux2VAEConfig.from_name("tiny")
    state = tiny_vae_state_dict(seed, cfg)
    state = {k: (v if k.startswith("bn.") else v.to(dtype)) for k, v in state.items()}
    dest = Path(dest)
    if layout == "diffusers":
        out = {}
        for k, v in state.items():
            if is_attention_projection(k):
                v = v.reshape(v.shape[0], v.shape[1])  # 1x1 conv -> Linear
            out[bfl_to_diffusers_key(k, cfg.num_levels)] = v.contiguous()
        out["bn.num_batches_tracked"] = torch.tensor(0, dtype=torch.int64)
        dest.mkdir(parents=True, exist_ok=True)
        (dest / "config.json").write_text(json.dumps(_diffusers_config(cfg), indent=2))
        save_file(out, str(dest / "diffusion_pytorch_model.safetensors"))
        return dest
    if layout == "comfyui":
        state["bn.num_batches_tracked"] = torch.tensor(0, dtype=torch.int64)
    dest.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(dest))
    return dest
