"""The variant rules shared by the library and the nodes: defaults, CFG, encoder pairing, run estimates."""

from __future__ import annotations

import math

import pytest
import torch

from flux2_core import (
    DOWNSCALE,
    LATENT_CHANNELS,
    Flux2Config,
    InputError,
    block_flops,
    check_finite,
    check_latents,
    check_text,
    check_text_encoder,
    latent_shape,
    plan_sampling,
    reference_token_count,
)
from flux2_core.sampling import plan_guidance, text_encoder_kind
from flux2_core.text_encoders.spec import DECODER_PRESETS, TextEncoderSpec

VARIANTS = ("dev", "klein-4b", "klein-9b", "klein-base-4b", "klein-base-9b", "klein-9b-kv")
# The encoder each published model card names.
ENCODER_OF = {
    "dev": "mistral-small-3.2-24b",
    "klein-4b": "qwen3-4b",
    "klein-base-4b": "qwen3-4b",
    "klein-9b": "qwen3-8b",
    "klein-base-9b": "qwen3-8b",
    "klein-9b-kv": "qwen3-8b",
}


@pytest.mark.parametrize("variant", VARIANTS)
def test_defaults_follow_the_config_flags(variant):
    cfg = Flux2Config.from_name(variant)
    plan = plan_sampling(cfg, 1024, 1024)
    if cfg.guidance_embed:
        assert (plan.guidance.mode, plan.guidance.scale, plan.steps) == ("embedded", 4.0, 50)
    elif cfg.distilled:
        assert (plan.guidance.mode, plan.guidance.scale, plan.steps) == ("none", None, 4)
    else:
        assert (plan.guidance.mode, plan.guidance.scale, plan.steps) == ("cfg", 4.0, 50)
    assert plan.passes == (2 if plan.guidance.mode == "cfg" else 1)
    # explicit values win over the defaults
    assert plan_sampling(cfg, 1024, 1024, steps=7).steps == 7


def test_cfg_needs_a_scale_above_one_and_doubles_the_work():
    cfg = Flux2Config.from_name("klein-base-4b")
    one = plan_sampling(cfg, 512, 512, guidance=1.0)
    cfg_plan = plan_sampling(cfg, 512, 512, guidance=3.0, batch=2)
    assert one.guidance.mode == "none" and one.passes == 1
    assert cfg_plan.guidance.mode == "cfg" and cfg_plan.passes == 4  # 2 images x (positive + negative)
    per = block_flops(cfg, cfg_plan.tokens).per_block
    assert cfg_plan.block_flops == tuple(4 * f for f in per)


def test_tokens_and_activation_estimate():
    cfg = Flux2Config.from_name("klein-9b")
    refs = [torch.zeros(1, LATENT_CHANNELS, 3, 5), torch.zeros(1, LATENT_CHANNELS, 4, 4)]
    n_ref = reference_token_count(refs)
    assert n_ref == 15 + 16
    plan = plan_sampling(cfg, 768, 512, reference_tokens=n_ref)
    assert (
        plan.tokens
        == (768 // DOWNSCALE) * (512 // DOWNSCALE) + TextEncoderSpec.for_kind("qwen3").max_length + n_ref
    )
    assert plan.block_flops == block_flops(cfg, plan.tokens).per_block
    bigger = plan_sampling(cfg, 1024, 1024, reference_tokens=n_ref)
    # linear in the token count and in the model width
    assert bigger.activation_bytes * plan.tokens == plan.activation_bytes * bigger.tokens
    wide = cfg.replace(hidden_size=cfg.hidden_size * 2, num_heads=cfg.num_heads * 2)
    assert plan_sampling(wide, 768, 512, reference_tokens=n_ref).activation_bytes == 2 * plan.activation_bytes


@pytest.mark.parametrize("variant", ENCODER_OF)
def test_each_model_reads_its_published_encoder(variant):
    cfg = Flux2Config.from_name(variant)
    name = ENCODER_OF[variant]
    kind = "mistral3" if name.startswith("mistral") else "qwen3"
    width = TextEncoderSpec.for_kind(kind).context_dim(DECODER_PRESETS[name].hidden_size)
    assert text_encoder_kind(cfg) == kind and cfg.context_dim == width
    check_text_encoder(cfg, width, kind, "model.safetensors", "te.safetensors")  # the right pair passes
    for other, shape in DECODER_PRESETS.items():
        other_kind = "mistral3" if other.startswith("mistral") else "qwen3"
        if other == name:
            continue
        other_width = TextEncoderSpec.for_kind(other_kind).context_dim(shape.hidden_size)
        with pytest.raises(InputError) as e:
            check_text_encoder(cfg, other_width, other_kind, "flux-model.safetensors", f"{other}.safetensors")
        assert "flux-model.safetensors" in str(e.value) and f"{other}.safetensors" in str(e.value)


def test_same_width_other_family_is_refused():
    cfg = Flux2Config.from_name("dev")
    with pytest.raises(InputError, match="Mistral Small"):
        check_text_encoder(cfg, cfg.context_dim, "qwen3")


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_settings_are_refused_by_name(bad):
    with pytest.raises(InputError, match="denoise"):
        check_finite("Sampler", guidance=1.0, denoise=bad, skipped=None)
    with pytest.raises(InputError, match="finite"):
        plan_guidance(Flux2Config.from_name("dev"), bad)
    with pytest.raises(InputError, match="finite"):
        plan_sampling(Flux2Config.from_name("klein-base-4b"), 512, 512, guidance=bad)
    check_finite("Sampler", guidance=0.0, denoise=1.0)


def test_text_checks():
    assert check_text("Encode", "prompt", "ünïcode 🦊") == "ünïcode 🦊"
    with pytest.raises(
        InputError, match=r"prompt contains a lone UTF-16 surrogate \(U\+D800\) at character 4"
    ):
        check_text("Encode", "prompt", "bad \ud800")
    with pytest.raises(InputError, match="not text"):
        check_text("Encode", "prompt", 5)


def test_latent_checks():
    lat = torch.zeros(latent_shape(96, 64, batch=2))
    assert lat.shape == (2, LATENT_CHANNELS, 4, 6)
    assert check_latents(lat, "Decode") == (96, 64)
    for bad in (torch.zeros(1, 16, 4, 4), torch.zeros(LATENT_CHANNELS, 4, 4), {"samples": lat}):
        with pytest.raises(InputError, match="Decode: the latent"):
            check_latents(bad, "Decode")
