"""Our sampler + VAE vs diffusers' Flux2Pipeline / Flux2KleinPipeline / Flux2KleinKVPipeline.

The same tiny random transformer (ours loaded from the BFL file, diffusers' from its diffusers
folder; identical weights by seed) and VAE, the same prompt embeddings and initial noise: the
latents and decoded images must agree. Prompt embeddings go straight into diffusers
(``prompt_embeds=``), so no text encoder is involved.
"""

from __future__ import annotations

import numpy as np
import PIL.Image
import pytest
import torch

from flux2_core import generate, prepare_reference_latents, sample_latents
from flux2_core.sampling import pack

W, H, STEPS = 96, 64, 3


def _diffusers_pipe(variant, folder, dvae):
    from diffusers import (
        FlowMatchEulerDiscreteScheduler,
        Flux2KleinKVPipeline,
        Flux2KleinPipeline,
        Flux2Pipeline,
        Flux2Transformer2DModel,
    )

    transformer = Flux2Transformer2DModel.from_pretrained(folder, subfolder="transformer").eval()
    # The published scheduler_config.json of the FLUX.2 repos (dynamic shifting; mu given by the pipeline).
    scheduler = FlowMatchEulerDiscreteScheduler(
        use_dynamic_shifting=True,
        shift=3.0,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )
    common = dict(scheduler=scheduler, vae=dvae, text_encoder=None, tokenizer=None, transformer=transformer)
    if variant == "dev":
        return Flux2Pipeline(**common)
    if variant.endswith("kv"):
        return Flux2KleinKVPipeline(**common)
    return Flux2KleinPipeline(**common, is_distilled="base" not in variant)


def _references(n, seed=0):
    rng = np.random.default_rng(seed)
    sizes = [(64, 64), (64, 80), (80, 64)]
    pils = [PIL.Image.fromarray(rng.integers(0, 256, (*sizes[k % 3], 3), dtype=np.uint8)) for k in range(n)]
    tensors = [torch.from_numpy(np.asarray(p).copy()).permute(2, 0, 1).float() / 127.5 - 1 for p in pils]
    return pils, tensors


CASES = [
    ("dev", 0, 1),
    ("dev", 1, 1),
    ("klein-4b", 0, 1),
    ("klein-4b", 2, 2),
    ("klein-base-4b", 0, 1),
    ("klein-base-4b", 2, 1),
    ("klein-9b-kv", 2, 1),
    ("klein-9b-kv", 0, 1),
]


@pytest.mark.parametrize("variant, n_refs, batch", CASES, ids=[f"{v}-refs{r}-b{b}" for v, r, b in CASES])
def test_matches_diffusers(tiny_models, vae, diffusers_vae, variant, n_refs, batch):
    ours, folder = tiny_models(variant)
    pipe = _diffusers_pipe(variant, folder, diffusers_vae)
    g = torch.Generator().manual_seed(1)
    ctx = ours.config.context_dim
    pos = torch.randn(batch, 12, ctx, generator=g)
    neg = torch.randn(batch, 12, ctx, generator=g)
    noise = torch.randn(batch, 128, H // 16, W // 16, generator=g)
    pils, refs = _references(n_refs)

    kw = dict(prompt_embeds=pos, latents=noise, height=H, width=W, num_inference_steps=STEPS)
    if "base" in variant:
        kw["negative_prompt_embeds"] = neg
    if variant == "dev":
        kw["guidance_scale"] = 3.5
    if n_refs:
        kw["image"] = pils
    with torch.no_grad():
        ref_latents = pipe(**kw, output_type="latent").images
        ref_images = pipe(**kw, output_type="pt").images  # (B, 3, H, W) in [0, 1]

    guidance = 3.5 if variant == "dev" else None
    ref_lat = prepare_reference_latents(vae, refs) if n_refs else None
    latents = sample_latents(
        transformer=ours,
        prompt_embeds=pos,
        negative_prompt_embeds=neg,
        reference_latents=ref_lat,
        width=W,
        height=H,
        steps=STEPS,
        guidance=guidance,
        noise=noise,
    )
    if ref_latents.ndim == 3:
        # Flux2Pipeline returns the normalised packed tokens (B, N, 128), row-major.
        torch.testing.assert_close(pack(latents), ref_latents, rtol=1e-4, atol=1e-4)
    else:
        # The klein pipelines return de-normalised, unpatchified latents (B, 32, H/8, W/8).
        torch.testing.assert_close(vae.denormalize(latents), ref_latents, rtol=1e-4, atol=1e-4)
    images = generate(
        transformer=ours,
        vae=vae,
        prompt_embeds=pos,
        negative_prompt_embeds=neg,
        reference_images=refs or None,
        width=W,
        height=H,
        steps=STEPS,
        guidance=guidance,
        noise=noise,
    )
    torch.testing.assert_close((images + 1) / 2, ref_images, rtol=1e-4, atol=1e-4)

    if n_refs:
        # The references must matter (guards against a test that passes with refs ignored).
        plain = sample_latents(
            transformer=ours,
            prompt_embeds=pos,
            negative_prompt_embeds=neg,
            width=W,
            height=H,
            steps=STEPS,
            guidance=guidance,
            noise=noise,
        )
        assert (plain - latents).abs().max() > 1e-2
