"""Every published layout loads to the same encoder; wrong files get clear errors."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file
from torch.testing import assert_close

from flux2_core import CheckpointError, load_text_encoder
from flux2_core.tiny.text_encoder import is_decoder_linear, quantize_fp8

PROMPTS = ("a glass teapot on a wooden table",)


@pytest.mark.parametrize(
    ("kind", "layout", "expected_name"),
    [
        ("mistral3", "comfyui", "decoder"),
        ("mistral3", "comfyui-pruned", "decoder"),
        ("mistral3", "comfyui-bundled", "comfyui-bundled"),
        ("mistral3", "hf-legacy", "hf-mistral3-legacy"),
        ("qwen3-4b", "comfyui", "decoder"),
        ("qwen3-8b", "comfyui-bundled", "comfyui-bundled"),
        ("qwen3-8b", "hf", "decoder"),
    ],
)
def test_layout_equals_reference(kind, layout, expected_name, encoder, ref_states):
    enc = encoder(kind, layout)
    assert enc.checkpoint_layout == expected_name
    assert enc.kind == ("mistral3" if kind == "mistral3" else "qwen3")
    assert_close(enc.encode(list(PROMPTS)), ref_states(kind, PROMPTS))


def _dequantized_reference(model):
    """The reference with every decoder Linear replaced by its fp8 round trip (what the file holds)."""
    import copy

    ref = copy.deepcopy(model)
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if is_decoder_linear(name):
                w8, scale = quantize_fp8(p.to(torch.bfloat16))
                p.copy_(w8.float() * scale)
    return ref


@pytest.mark.parametrize("layout", ["comfyui-fp8", "comfyui-fp8-legacy"])
def test_fp8_layouts_dequantize_per_layer(layout, encoder, reference, ref_states):
    from flux2_core.text_encoders.fp8 import Fp8Linear

    enc = encoder("mistral3", layout)
    assert enc.quant == ("fp8" if layout == "comfyui-fp8" else "fp8-legacy")
    q = enc.model.layers[0].self_attn.q_proj
    assert isinstance(q, Fp8Linear) and q.weight.dtype == torch.float8_e4m3fn  # stays fp8 in memory
    expected = ref_states(
        "mistral3", PROMPTS, lambda: _dequantized_reference(reference("mistral3")), tag="fp8"
    )
    assert_close(enc.encode(list(PROMPTS)), expected)


def test_embedded_tekken_equals_tekken_file(encoder):
    comfy, hf = encoder("mistral3", "comfyui"), encoder("mistral3", "hf")
    assert "embedded tekken_model" in comfy.tokenizer.source
    assert comfy.tokenizer.prompt_ids("a fox") == hf.tokenizer.prompt_ids("a fox")


def test_pruned_file_has_30_layers_and_cannot_upsample(encoder):
    enc = encoder("mistral3", "comfyui-pruned")
    assert enc.model.config.num_hidden_layers == 30
    with pytest.raises(CheckpointError, match="pruned 30-layer"):
        enc.generator()


def test_file_without_head_cannot_upsample(encoder):
    with pytest.raises(CheckpointError, match="no output head"):
        encoder("mistral3", "comfyui").generator()


def test_config_inferred_from_shapes(encoder):
    cfg = encoder("qwen3-8b", "comfyui-bundled").model.config
    assert (cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (64, 2, 1, 32)
    assert (cfg.intermediate_size, cfg.vocab_size, cfg.num_hidden_layers) == (160, 151936, 36)
    mcfg = encoder("mistral3", "comfyui").model.config
    assert (
        mcfg.head_dim,
        mcfg.num_attention_heads,
        mcfg.rope_theta if hasattr(mcfg, "rope_theta") else mcfg.rope_parameters["rope_theta"],
    ) == (32, 2, 1e9)


# ------------------------------------------------------------------------------------ wrong files
def test_flux2_transformer_is_refused(tmp_path):
    from flux2_core.tiny.transformer import write_tiny_transformer

    path = write_tiny_transformer(
        tmp_path / "flux-2-klein-4b.safetensors", variant="klein-4b", layout="comfyui"
    )
    with pytest.raises(CheckpointError, match="diffusion transformer") as e:
        load_text_encoder(path)
    assert "Fix:" in str(e.value) and "qwen_3_4b" in str(e.value)


def test_vae_is_refused(tmp_path):
    from flux2_core.tiny.vae import write_tiny_vae

    path = write_tiny_vae(tmp_path / "flux2-vae.safetensors", layout="bfl")
    with pytest.raises(CheckpointError, match="a VAE"):
        load_text_encoder(path)


def test_clip_and_unknown_files_are_refused(tmp_path):
    clip = tmp_path / "clip_l.safetensors"
    save_file({"text_model.encoder.layers.0.mlp.fc1.weight": torch.zeros(4, 2)}, str(clip))
    with pytest.raises(CheckpointError, match="CLIP or T5"):
        load_text_encoder(clip)
    other = tmp_path / "other.safetensors"
    save_file({"foo.weight": torch.zeros(2)}, str(other))
    with pytest.raises(CheckpointError, match="not a Mistral Small 3.x or Qwen3"):
        load_text_encoder(other)


def test_pickle_is_refused(tmp_path):
    bad = tmp_path / "qwen_3_4b.bin"
    bad.write_bytes(b"\x80\x04junk")
    with pytest.raises(CheckpointError):
        load_text_encoder(bad)


def test_missing_layers_and_tensors(tmp_path, tiny_file, qwen_tokenizer_dir):
    from safetensors.torch import load_file

    sd = load_file(str(tiny_file("qwen3-4b", "comfyui")))
    gap = {k: v for k, v in sd.items() if not k.startswith("model.layers.5.")}
    save_file(gap, str(tmp_path / "gap.safetensors"))
    with pytest.raises(CheckpointError, match=r"layers \[5\] are missing"):
        load_text_encoder(tmp_path / "gap.safetensors", tokenizer=qwen_tokenizer_dir)
    short = {
        k: v for k, v in sd.items() if not any(k.startswith(f"model.layers.{i}.") for i in range(20, 36))
    }
    save_file(short, str(tmp_path / "short.safetensors"))
    with pytest.raises(CheckpointError, match="has 20 decoder layers"):
        load_text_encoder(tmp_path / "short.safetensors", tokenizer=qwen_tokenizer_dir)
    no_norm = {k: v for k, v in sd.items() if k != "model.layers.3.post_attention_layernorm.weight"}
    save_file(no_norm, str(tmp_path / "no_norm.safetensors"))
    with pytest.raises(CheckpointError, match="post_attention_layernorm"):
        load_text_encoder(tmp_path / "no_norm.safetensors", tokenizer=qwen_tokenizer_dir)


def test_nvfp4_text_encoder_is_refused(tmp_path, tiny_file):
    from safetensors.torch import load_file

    sd = load_file(str(tiny_file("qwen3-4b", "comfyui")))
    w = sd["model.layers.0.self_attn.q_proj.weight"]
    sd["model.layers.0.self_attn.q_proj.weight"] = torch.zeros(w.shape[0], w.shape[1] // 2, dtype=torch.uint8)
    sd["model.layers.0.self_attn.q_proj.weight_scale_2"] = torch.ones(())
    sd["model.layers.0.self_attn.q_proj.comfy_quant"] = torch.tensor(
        list(json.dumps({"format": "nvfp4"}).encode()), dtype=torch.uint8
    )
    save_file(sd, str(tmp_path / "fp4.safetensors"))
    with pytest.raises(CheckpointError, match="4-bit"):
        load_text_encoder(tmp_path / "fp4.safetensors")


def test_text_encoder_folder_given_directly(tiny_file, encoder):
    """Pointing at <pipeline>/text_encoder (not the pipeline root) finds config and ../tokenizer too."""
    enc = load_text_encoder(tiny_file("mistral3", "hf") / "text_encoder", dtype=torch.float32, cache=None)
    assert enc.checkpoint_layout == "hf-mistral3" and enc.tokenizer.source.endswith("tekken.json")
    assert_close(enc.encode("a cat"), encoder("mistral3", "hf").encode("a cat"))


def test_other_language_models_are_refused(tmp_path, tiny_file):
    """Llama-style files share Mistral's key names; the vocabulary tells them apart."""
    from safetensors.torch import load_file

    sd = load_file(str(tiny_file("mistral3", "comfyui")))
    sd["model.embed_tokens.weight"] = torch.zeros(128256, 64, dtype=torch.bfloat16)  # Llama 3 vocabulary
    save_file(sd, str(tmp_path / "llama3.safetensors"))
    with pytest.raises(CheckpointError, match="128256-token vocabulary, not Mistral Small 3.x"):
        load_text_encoder(tmp_path / "llama3.safetensors")


def test_mixed_fp8_file_keeps_bf16_linears(tmp_path, tiny_file, encoder):
    """fp8 "mixed" files: only the Linears stored as float8 become Fp8Linear; results are unchanged."""
    from safetensors.torch import load_file

    from flux2_core.text_encoders.fp8 import Fp8Linear

    sd = load_file(str(tiny_file("mistral3", "comfyui-fp8")))
    for key in [k for k in sd if ".self_attn." in k and k.endswith("_proj.weight")]:
        base = key[: -len(".weight")]
        sd[key] = sd[key].float() * sd.pop(base + ".weight_scale")  # float32: exact
        sd.pop(base + ".comfy_quant")
    save_file(sd, str(tmp_path / "mixed.safetensors"))
    enc = load_text_encoder(tmp_path / "mixed.safetensors", dtype=torch.float32, cache=None)
    layer = enc.model.layers[0]
    assert type(layer.self_attn.q_proj) is torch.nn.Linear and isinstance(layer.mlp.gate_proj, Fp8Linear)
    assert_close(enc.encode(list(PROMPTS)), encoder("mistral3", "comfyui-fp8").encode(list(PROMPTS)))
