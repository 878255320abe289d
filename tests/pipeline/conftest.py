"""Fixtures: tiny random VAEs and transformers written in the real layouts, loaded by the real loaders."""

from __future__ import annotations

import pytest
import torch

from flux2_core import load_transformer, load_vae
from flux2_core.tiny.transformer import write_tiny_transformer
from flux2_core.tiny.vae import write_tiny_vae


@pytest.fixture(autouse=True)
def _fp32_default():
    torch.set_default_dtype(torch.float32)
    yield


@pytest.fixture(scope="session")
def vae_files(tmp_path_factory) -> dict[str, str]:
    """The same tiny VAE (seed 0) in every layout: layout -> path."""
    root = tmp_path_factory.mktemp("vae")
    return {
        "bfl": str(write_tiny_vae(root / "ae.safetensors", "bfl")),
        "comfyui": str(write_tiny_vae(root / "flux2-vae.safetensors", "comfyui")),
        "diffusers": str(write_tiny_vae(root / "pipe" / "vae", "diffusers").parent),
    }


@pytest.fixture(scope="session")
def vae(vae_files):
    return load_vae(vae_files["bfl"], dtype=torch.float32)


@pytest.fixture(scope="session")
def diffusers_vae(vae_files):
    from diffusers import AutoencoderKLFlux2

    return AutoencoderKLFlux2.from_pretrained(vae_files["diffusers"], subfolder="vae").eval()


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """variant -> (our transformer from the BFL file, diffusers pipeline folder), same weights (seed 0)."""
    cache: dict[str, tuple] = {}
    root = tmp_path_factory.mktemp("transformers")

    def get(variant: str):
        if variant not in cache:
            bfl = write_tiny_transformer(root / "bfl", variant, "bfl", dtype=torch.float32)
            folder = write_tiny_transformer(root / "diffusers", variant, "diffusers", dtype=torch.float32)
            cache[variant] = (load_transformer(bfl, dtype=torch.float32), folder)
        return cache[variant]

    return get
