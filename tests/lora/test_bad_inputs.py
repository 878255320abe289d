"""Files that are not usable FLUX.2 LoRAs: each a CheckpointError that names the file and says why."""

from __future__ import annotations

import logging

import pytest
import torch
from safetensors.torch import save_file

from flux2_core import (
    CheckpointError,
    Flux2Config,
    Flux2Transformer,
    apply_loras,
    load_lora,
    load_transformer,
)
from flux2_core.tiny.lora import write_tiny_lora
from flux2_core.tiny.transformer import tiny_config


def _pair(prefix: str, out_f: int, in_f: int, rank: int = 2, a="lora_down", b="lora_up") -> dict:
    return {
        f"{prefix}.{a}.weight": torch.randn(rank, in_f),
        f"{prefix}.{b}.weight": torch.randn(out_f, rank),
    }


def _write(tmp_path, name: str, tensors: dict) -> str:
    path = tmp_path / name
    save_file(tensors, str(path))
    return str(path)


def _error(path) -> str:
    with pytest.raises(CheckpointError) as e:
        load_lora(path)
    assert str(path) in str(e.value)
    return str(e.value)


def test_flux1_lora_by_its_modulation_keys(tmp_path):
    # kohya FLUX.1: per-block img_mod / txt_mod / modulation.lin beside the qkv FLUX.2 also has
    sd = _pair("lora_unet_double_blocks_0_img_attn_qkv", 9216, 3072)
    sd |= _pair("lora_unet_double_blocks_0_img_mod_lin", 18432, 3072)
    msg = _error(_write(tmp_path, "flux1_kohya.safetensors", sd))
    assert "FLUX.1" in msg and "img_mod" in msg
    # diffusers FLUX.1: norm1.linear, single-block proj_mlp
    sd = _pair("transformer.transformer_blocks.0.attn.to_q", 3072, 3072, a="lora_A", b="lora_B")
    sd |= _pair("transformer.single_transformer_blocks.0.proj_mlp", 12288, 3072, a="lora_A", b="lora_B")
    assert "FLUX.1" in _error(_write(tmp_path, "flux1_diffusers.safetensors", sd))
    # BFL names and no modulation keys: FLUX.1's MLP shape gives it away (linear1 out = 7 x 3072)
    sd = _pair("diffusion_model.single_blocks.0.linear1", 7 * 3072, 3072, a="lora_A", b="lora_B")
    assert "FLUX.1" in _error(_write(tmp_path, "flux1_bfl.safetensors", sd))


def test_flux1_attention_lora_on_klein_4b_fails_on_its_block_count(tmp_path):
    """FLUX.1 has klein 4B's width; an attention-only FLUX.1 LoRA still names blocks 4B lacks."""
    sd = {}
    for i in (0, 12):
        sd |= _pair(f"lora_unet_double_blocks_{i}_img_attn_qkv", 9216, 3072)
    path = _write(tmp_path, "flux1_attn.safetensors", sd)
    lora = load_lora(path)
    model = Flux2Transformer(Flux2Config.from_name("klein-4b"), device="meta")
    with pytest.raises(CheckpointError) as e:
        apply_loras(model, [(lora, 1.0)])
    msg = str(e.value)
    assert path in msg and "double_blocks.12.img_attn.qkv: the model has 5 double blocks" in msg
    assert "FLUX.1" in msg


def test_sdxl_lora(tmp_path):
    sd = _pair("lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q", 640, 640)
    sd |= _pair("lora_te1_text_model_encoder_layers_0_self_attn_q_proj", 768, 768)
    msg = _error(_write(tmp_path, "sdxl.safetensors", sd))
    assert "SDXL" in msg and "LoraLoader" in msg


def test_lora_for_another_flux2_variant(tmp_path):
    # [dev]'s width on a [klein] 4B model (built on the meta device: only shapes are compared)
    sd = _pair("diffusion_model.double_blocks.0.img_attn.qkv", 3 * 6144, 6144, rank=1, a="lora_A", b="lora_B")
    path = _write(tmp_path, "dev_lora.safetensors", sd)
    lora = load_lora(path)
    assert lora.hidden_size == 6144
    model = Flux2Transformer(Flux2Config.from_name("klein-4b"), device="meta")
    with pytest.raises(CheckpointError) as e:
        apply_loras(model, [(lora, 1.0)])
    msg = str(e.value)
    assert path in msg and "dev (width 6144)" in msg and "klein-4b model (width 3072" in msg


def test_same_width_other_shapes(tmp_path, tiny_models):
    """Same width, another text width: caught per layer, and nothing is applied."""
    model = load_transformer(tiny_models("klein-4b"), dtype=torch.float32)
    other = tiny_config("dev")  # hidden 256 like the model, text width 96 instead of 64
    path, _ = write_tiny_lora(
        tmp_path / "other.safetensors", other, "ai-toolkit", targets=["txt_in", "img_in"]
    )
    with pytest.raises(CheckpointError) as e:
        apply_loras(model, [(load_lora(path), 1.0)])
    assert str(path) in str(e.value) and "txt_in: LoRA 256x96, layer 256x64" in str(e.value)
    assert not any(m._forward_hooks for m in model.modules())


def test_ranks_that_disagree(tmp_path):
    sd = {
        "diffusion_model.img_in.lora_A.weight": torch.randn(4, 128),
        "diffusion_model.img_in.lora_B.weight": torch.randn(256, 3),
    }
    msg = _error(_write(tmp_path, "ranks.safetensors", sd))
    assert "ranks" in msg and "4 vs 3" in msg and "img_in.lora_A" in msg


def test_missing_factor(tmp_path):
    sd = {"lora_unet_img_in.lora_down.weight": torch.randn(4, 128)}
    assert "no matching up factor" in _error(_write(tmp_path, "half.safetensors", sd))


def test_pickle_renamed_safetensors(tmp_path):
    path = tmp_path / "renamed.safetensors"
    torch.save({"diffusion_model.img_in.lora_A.weight": torch.randn(2, 128)}, path)
    msg = _error(path)
    assert "pickle" in msg and "never" in msg


def test_dora_is_refused_with_the_reason(tmp_path):
    sd = _pair("diffusion_model.img_in", 256, 128, a="lora_A", b="lora_B")
    sd["diffusion_model.img_in.dora_scale"] = torch.ones(256, 1)
    msg = _error(_write(tmp_path, "dora.safetensors", sd))
    assert "DoRA" in msg and "dora_scale" in msg


def test_no_key_matches_lists_eight(tmp_path):
    sd = {}
    for i in range(5):
        sd |= _pair(f"model.layers.{i}.self_attn.q_proj", 64, 64, a="lora_A", b="lora_B")
    msg = _error(_write(tmp_path, "llm.safetensors", sd))
    assert "no key matches" in msg
    assert msg.count("'model.layers.") == 8 and "(and 2 more)" in msg


def test_partial_match_warns_with_counts_and_examples(tmp_path, caplog, tiny_models):
    model = load_transformer(tiny_models("dev"), dtype=torch.float32)
    path, _ = write_tiny_lora(tmp_path / "ok.safetensors", model.config, "ai-toolkit", targets=["img_in"])
    from safetensors.torch import load_file

    sd = load_file(str(path))
    sd |= _pair(
        "diffusion_model.double_blocks.0.img_attn_proj", 256, 256, a="lora_A", b="lora_B"
    )  # broken export
    sd["diffusion_model.double_blocks.0.img_attn.qkv.lora_B.bias"] = torch.zeros(768)
    bad = _write(tmp_path, "partial.safetensors", sd)
    with caplog.at_level(logging.WARNING, logger="flux2_core.lora"):
        lora = load_lora(bad)
    assert set(lora.layers) == {"img_in"}
    assert len(lora.unmatched) == 3
    (rec,) = [r for r in caplog.records if "not loaded" in r.getMessage()]
    text = rec.getMessage()
    assert bad in text and "3 of 6 LoRA keys not loaded (1 layers loaded)" in text
    assert "img_attn_proj.lora_A.weight (no FLUX.2 layer of that name)" in text and "no bias" in text
