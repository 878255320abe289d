"""Every bad input to the transformer loader gives a CheckpointError naming the file and the problem."""

import json
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file

from flux2_core import CheckpointError, InputError, load_transformer

from .conftest import make_inputs


def _save(path, tensors, metadata=None):
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)
    return path


def _z(*shape):
    return torch.zeros(shape, dtype=torch.bfloat16)


FOREIGN = {
    "flux1": (
        {
            "img_in.weight": _z(32, 64),
            "txt_in.weight": _z(32, 40),
            "vector_in.in_layer.weight": _z(32, 8),
            "double_blocks.0.img_mod.lin.weight": _z(192, 32),
            "double_blocks.0.img_attn.norm.key_norm.scale": _z(16),
        },
        "FLUX.1",
    ),
    "flux1_diffusers": (
        {
            "x_embedder.weight": _z(32, 64),
            "time_text_embed.timestep_embedder.linear_1.weight": _z(32, 8),
            "transformer_blocks.0.norm1.linear.weight": _z(192, 32),
        },
        "FLUX.1",
    ),
    "sdxl": (
        {
            "model.diffusion_model.input_blocks.0.0.weight": _z(8, 4, 3, 3),
            "conditioner.embedders.0.transformer.text_model.embeddings.position_ids": _z(1, 77),
        },
        "SDXL",
    ),
    "vae": (
        {
            "encoder.conv_in.weight": _z(8, 3, 3, 3),
            "decoder.conv_in.weight": _z(8, 32, 3, 3),
            "bn.running_mean": _z(128),
        },
        "VAE",
    ),
    "qwen3": (
        {"model.embed_tokens.weight": _z(16, 8), "model.layers.0.mlp.up_proj.weight": _z(8, 8)},
        "text encoder",
    ),
    "comfy_te": (
        {"text_encoders.qwen3_4b.transformer.model.layers.0.mlp.up_proj.weight": _z(8, 8)},
        "text encoder",
    ),
    "random": ({"foo.weight": _z(2, 2)}, "not a FLUX.2 transformer"),
}


@pytest.mark.parametrize("kind", list(FOREIGN))
def test_foreign_models_are_named(tmp_path, kind):
    tensors, needle = FOREIGN[kind]
    path = _save(tmp_path / f"{kind}.safetensors", tensors)
    with pytest.raises(CheckpointError) as e:
        load_transformer(path)
    msg = str(e.value)
    assert str(path) in msg and needle in msg and "Fix:" in msg
    # A FLUX.2 part in the wrong folder: the loader that takes it lists only its own folder.
    folder = {"vae": "models/vae/", "qwen3": "models/text_encoders/", "comfy_te": "models/text_encoders/"}
    if kind in folder:
        assert f"moving the file to ComfyUI/{folder[kind]}" in msg, msg


def test_missing_keys_listed(tmp_path, tiny_files):
    sd = load_file(str(tiny_files("klein-4b", "bfl")))
    del sd["double_blocks.1.txt_mlp.2.weight"], sd["single_blocks.0.norm.key_norm.scale"]
    path = _save(tmp_path / "missing.safetensors", sd)
    with pytest.raises(CheckpointError, match="2 missing key") as e:
        load_transformer(path)
    assert "double_blocks.1.txt_mlp.2.weight" in str(
        e.value
    ) and "single_blocks.0.norm.key_norm.scale" in str(e.value)


def test_unexpected_keys_listed(tmp_path, tiny_files):
    sd = load_file(str(tiny_files("klein-4b", "bfl")))
    sd["double_blocks.0.img_attn.lora_down.weight"] = torch.zeros(4, 4)
    path = _save(tmp_path / "extra.safetensors", sd)
    with pytest.raises(CheckpointError, match="unexpected key.*lora_down"):
        load_transformer(path)


def test_shape_mismatch(tmp_path, tiny_files):
    sd = load_file(str(tiny_files("klein-4b", "bfl")))
    sd["double_blocks.0.img_attn.proj.weight"] = torch.zeros(256, 128)
    path = _save(tmp_path / "shape.safetensors", sd)
    with pytest.raises(CheckpointError, match=r"wrong shape.*img_attn\.proj\.weight"):
        load_transformer(path)


def test_truncated_and_empty_and_corrupt(tmp_path, tiny_files):
    good = tiny_files("klein-4b", "bfl").read_bytes()
    cases = {
        "truncated": good[: len(good) // 2],
        "empty": b"",
        "corrupt": struct.pack("<Q", 20) + b'{"broken json' + b"\0" * 40,
    }
    for name, data in cases.items():
        p = tmp_path / f"{name}.safetensors"
        p.write_bytes(data)
        with pytest.raises(CheckpointError) as e:
            load_transformer(p)
        assert str(p) in str(e.value), name


def test_unknown_dtype(tmp_path):
    header = json.dumps(
        {"img_in.weight": {"dtype": "F6_E3M2", "shape": [2], "data_offsets": [0, 2]}}
    ).encode()
    p = tmp_path / "odd.safetensors"
    p.write_bytes(struct.pack("<Q", len(header)) + header + b"\0\0")
    with pytest.raises(CheckpointError, match="F6_E3M2"):
        load_transformer(p)


def test_pickle_and_missing_path(tmp_path):
    p = tmp_path / "flux2-dev.pt"
    torch.save({"img_in.weight": torch.zeros(1)}, p)
    with pytest.raises(CheckpointError, match="pickle"):
        load_transformer(p)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_transformer(tmp_path / "nope.safetensors")


def test_unreadable_path(tmp_path):
    folder = tmp_path / "flux-2-klein-4b.safetensors"  # a folder, not a file
    folder.mkdir()
    with pytest.raises(CheckpointError, match="no .safetensors"):
        load_transformer(folder)


def test_bad_dtype_and_missing_guidance(tiny_files):
    with pytest.raises(ValueError, match="bf16, fp16 or fp32"):
        load_transformer(tiny_files("dev", "bfl"), dtype=torch.int8)
    model = load_transformer(tiny_files("dev", "bfl"), dtype=torch.float32)
    x = make_inputs(model.config)
    x["guidance"] = None
    with pytest.raises(InputError, match="guidance"):
        model(**x)
