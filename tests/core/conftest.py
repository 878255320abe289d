import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # helper modules of these tests (fast_numerics)

from flux2_core.tiny.transformer import write_tiny_transformer


def make_inputs(config, batch=1, n_img=16, n_ref=8, n_txt=7, seed=1):
    """Text, target and in-context reference tokens with BFL-style position ids."""
    g = torch.Generator().manual_seed(seed)
    n = n_img + n_ref
    img = torch.randn(batch, n, 128, generator=g)
    txt = torch.randn(batch, n_txt, config.context_dim, generator=g)
    img_ids = torch.zeros(batch, n, 4)
    img_ids[:, :n_img, 1] = torch.arange(n_img) // 4
    img_ids[:, :n_img, 2] = torch.arange(n_img) % 4
    img_ids[:, n_img:, 0] = 10
    img_ids[:, n_img:, 1] = torch.arange(n_ref) // 4
    img_ids[:, n_img:, 2] = torch.arange(n_ref) % 4
    txt_ids = torch.zeros(batch, n_txt, 4)
    txt_ids[..., 3] = torch.arange(n_txt)
    t = torch.linspace(0.8, 0.3, batch)
    guidance = torch.full((batch,), 4.0) if config.guidance_embed else None
    return dict(img=img, img_ids=img_ids, txt=txt, txt_ids=txt_ids, timesteps=t, guidance=guidance)


@pytest.fixture(scope="session")
def tiny_files(tmp_path_factory):
    """Lazily written tiny checkpoints, cached per (variant, layout, dtype)."""
    root = tmp_path_factory.mktemp("tiny")
    cache = {}

    def get(variant, layout, dtype=torch.float32):
        key = (variant, layout, dtype)
        if key not in cache:
            folder = root / f"{variant}-{layout}-{str(dtype)[6:]}"
            cache[key] = write_tiny_transformer(folder, variant, layout, dtype, seed=0)
        return cache[key]

    return get
