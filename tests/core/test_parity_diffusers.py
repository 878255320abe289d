"""Forward parity with diffusers' Flux2Transformer2DModel on the same random weights, converted with
diffusers' own BFL-to-diffusers conversion (float32)."""

import pytest
import torch
from diffusers import Flux2Transformer2DModel  # noqa: E402
from diffusers.loaders.single_file_utils import convert_flux2_transformer_checkpoint_to_diffusers  # noqa: E402
from safetensors.torch import load_file

from flux2_core import Flux2KVCache, load_transformer

from .conftest import make_inputs


def _reference(path, config):
    ref = Flux2Transformer2DModel(
        num_layers=config.depth,
        num_single_layers=config.depth_single,
        num_attention_heads=config.num_heads,
        joint_attention_dim=config.context_dim,
        guidance_embeds=config.guidance_embed,
    )
    ref.load_state_dict(convert_flux2_transformer_checkpoint_to_diffusers(load_file(str(path))), strict=True)
    return ref.eval()


@pytest.mark.parametrize("variant", ["dev", "klein-4b"])
def test_forward_matches_diffusers(tiny_files, variant):
    path = tiny_files(variant, "bfl")
    model = load_transformer(path, dtype=torch.float32)
    ref = _reference(path, model.config)
    x = make_inputs(model.config, batch=2)
    with torch.no_grad():
        ours = model(**x)
        theirs = ref(
            hidden_states=x["img"],
            encoder_hidden_states=x["txt"],
            timestep=x["timesteps"],
            img_ids=x["img_ids"][0],
            txt_ids=x["txt_ids"][0],
            guidance=x["guidance"],
            return_dict=False,
        )[0]
    assert ours.shape == (2, 24, 128)
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


def test_kv_variant_matches_diffusers_extract_and_cached(tiny_files):
    from diffusers.models.transformers.transformer_flux2 import (
        Flux2KVAttnProcessor,
        Flux2KVParallelSelfAttnProcessor,
    )

    path = tiny_files("klein-9b-kv", "bfl")
    model = load_transformer(path, dtype=torch.float32)
    assert model.config.kv_refs
    ref = _reference(path, model.config)
    for b in ref.transformer_blocks:
        b.attn.set_processor(Flux2KVAttnProcessor())
    for b in ref.single_transformer_blocks:
        b.attn.set_processor(Flux2KVParallelSelfAttnProcessor())
    x = make_inputs(model.config, n_img=16, n_ref=8)
    img, ref_img = x["img"][:, :16], x["img"][:, 16:]
    img_ids, ref_ids = x["img_ids"][:, :16], x["img_ids"][:, 16:]
    common = dict(txt=x["txt"], txt_ids=x["txt_ids"])
    cache = Flux2KVCache()
    with torch.no_grad():
        ours = model(
            img=img,
            img_ids=img_ids,
            timesteps=x["timesteps"],
            ref_img=ref_img,
            ref_ids=ref_ids,
            kv_cache=cache,
            **common,
        )
        theirs, their_cache = ref(
            hidden_states=torch.cat([ref_img, img], 1),
            encoder_hidden_states=x["txt"],
            timestep=x["timesteps"],
            img_ids=torch.cat([ref_ids, img_ids], 1)[0],
            txt_ids=x["txt_ids"][0],
            kv_cache_mode="extract",
            num_ref_tokens=8,
            return_dict=False,
        )
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)
        assert cache.filled and cache.num_ref_tokens == 8
        assert len(cache.double) == model.config.depth and len(cache.single) == model.config.depth_single

        img2, t2 = torch.randn_like(img), torch.tensor([0.4])
        ours2 = model(img=img2, img_ids=img_ids, timesteps=t2, kv_cache=cache, **common)
        theirs2 = ref(
            hidden_states=img2,
            encoder_hidden_states=x["txt"],
            timestep=t2,
            img_ids=img_ids[0],
            txt_ids=x["txt_ids"][0],
            kv_cache=their_cache,
            kv_cache_mode="cached",
            return_dict=False,
        )[0]
        torch.testing.assert_close(ours2, theirs2, rtol=1e-4, atol=1e-4)
        # the cached step equals recomputing the references without a cache
        uncached = model(img=img2, img_ids=img_ids, timesteps=t2, ref_img=ref_img, ref_ids=ref_ids, **common)
        torch.testing.assert_close(ours2, uncached, rtol=1e-5, atol=1e-5)
        # and differs from ignoring the references
        assert not torch.allclose(ours2, model(img=img2, img_ids=img_ids, timesteps=t2, **common), atol=1e-3)
