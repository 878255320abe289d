"""Tiny FLUX.2 transformers and LoRAs for the LoRA tests (real files, fp32 compute)."""

from __future__ import annotations

import pytest
import torch

from flux2_core import load_transformer
from flux2_core.tiny.gguf import write_tiny_gguf_transformer
from flux2_core.tiny.lora import write_tiny_lora
from flux2_core.tiny.transformer import write_tiny_transformer


def make_inputs(config, n_img=16, n_txt=6, seed=3):
    """One sample: image tokens on a 4-wide grid, text tokens, a sigma and (for [dev]) guidance."""
    g = torch.Generator().manual_seed(seed)
    img_ids = torch.zeros(1, n_img, 4)
    img_ids[0, :, 1] = torch.arange(n_img) // 4
    img_ids[0, :, 2] = torch.arange(n_img) % 4
    txt_ids = torch.zeros(1, n_txt, 4)
    txt_ids[0, :, 3] = torch.arange(n_txt)
    return dict(
        img=torch.randn(1, n_img, 128, generator=g),
        img_ids=img_ids,
        txt=torch.randn(1, n_txt, config.context_dim, generator=g),
        txt_ids=txt_ids,
        timesteps=torch.tensor([0.6]),
        guidance=torch.tensor([4.0]) if config.guidance_embed else None,
    )


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    """max |got - want| / max |want|."""
    return ((got.float() - want.float()).abs().max() / want.float().abs().max()).item()


def merged_reference(path, deltas_and_strengths, dtype=torch.float32):
    """An independent reference: the base file's weights + sum of strength x delta W, computed here
    from the writer's own record of the factors, loaded into a fresh transformer."""
    model = load_transformer(path, dtype=torch.float32, keep_quantized=False)  # GGUF/NVFP4 dequantized
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    for deltas, strength in deltas_and_strengths:
        for module, d in deltas.items():
            sd[module + ".weight"] += strength * d
    model.load_state_dict(sd)
    return model.to(dtype)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """variant -> tiny BFL transformer file (fp32 weights), written once."""
    root = tmp_path_factory.mktemp("lora-models")
    cache = {}

    def get(variant="dev", layout="bfl", dtype=torch.float32):
        key = (variant, layout, dtype)
        if key not in cache and layout == "gguf":  # a Q4_K_M-like mix, the file's own bytes
            cache[key] = write_tiny_gguf_transformer(root / f"{variant}-gguf", variant, mix="Q4_K_M")
        elif key not in cache:
            cache[key] = write_tiny_transformer(
                root / f"{variant}-{layout}-{str(dtype)[6:]}", variant, layout, dtype
            )
        return cache[key]

    return get


@pytest.fixture
def lora_file(tmp_path):
    """write_tiny_lora into this test's folder: lora_file(config, fmt, name=..., **kw) -> (path, deltas)."""

    def make(config, fmt="ai-toolkit", name=None, **kw):
        return write_tiny_lora(tmp_path / (name or f"{fmt}.safetensors"), config, fmt, **kw)

    return make
