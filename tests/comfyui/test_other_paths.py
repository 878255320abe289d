"""Node paths the shared workflows do not cover: image-to-image through VAE Encode, prompt upsampling."""

from __future__ import annotations

import numpy as np
import pytest
from comfy_helpers import WORKFLOWS, decode_png, load, nodes_of, shrink
from comfy_server import history_error, history_images


def test_image_to_image_through_vae_encode(comfy):
    prompt = shrink(load(WORKFLOWS / "flux2_klein_4b_text_to_image.api.json"), steps=4)
    prompt["30"] = {"class_type": "LoadImage", "inputs": {"image": "flux2_reference_1.png"}}  # 96x64
    prompt["31"] = {
        "class_type": "Flux2LocalVAEEncode",
        "inputs": {"vae": ["3", 0], "pixels": ["30", 0], "tiling": "auto"},
    }
    sampler = nodes_of(prompt, "Flux2LocalSampler")[0]
    sampler["inputs"].update({"latent": ["31", 0], "denoise": 0.5})
    entry = comfy.run(prompt)
    assert history_error(entry) is None, history_error(entry)
    (img,) = history_images(entry)
    pixels = decode_png(comfy.view(img))
    assert pixels.shape == (64, 96, 3)  # the latent's size wins over width/height
    assert np.isfinite(pixels).all() and pixels.std() > 1e-3


@pytest.fixture(scope="module")
def hf_text_encoders(comfy) -> dict[str, str]:
    """Tiny Hugging Face pipeline folders (with the language-model head upsampling needs)."""
    from flux2_core.tiny.text_encoder import write_tiny_text_encoder

    out = {}
    for kind, folder in (("qwen3-4b", "tiny-klein-hf"), ("mistral3", "tiny-dev-hf")):
        root = comfy.base / "models" / "text_encoders" / folder
        if not root.exists():
            write_tiny_text_encoder(root, kind=kind, layout="hf", seed=5)
        out[kind] = f"{folder}/text_encoder/"
    return out


def _upsample_prompt(te_name: str, with_images: bool) -> dict:
    prompt = {
        "te": {
            "class_type": "Flux2LocalTextEncoderLoader",
            "inputs": {"text_encoder_name": te_name, "tokenizer": "auto", "dtype": "fp32"},
        },
        "enc": {
            "class_type": "Flux2LocalEncodePrompt",
            "inputs": {
                "text_encoder": ["te", 0],
                "prompt": "a cat",
                "negative_prompt": "",
                "upsample_prompt": True,
                "upsample_seed": 3,
                "upsample_max_tokens": 8,
            },
        },
        "show": {"class_type": "PreviewAny", "inputs": {"source": ["enc", 1]}},
    }
    if with_images:
        prompt["img"] = {"class_type": "LoadImage", "inputs": {"image": "flux2_reference_2.png"}}
        prompt["enc"]["inputs"]["upsample_images"] = ["img", 0]
    return prompt


@pytest.mark.parametrize(
    ("kind", "with_images"), [("qwen3-4b", False), ("mistral3", True)], ids=["qwen3", "mistral3-with-image"]
)
def test_prompt_upsampling_outputs_the_rewritten_prompt(comfy, hf_text_encoders, kind, with_images):
    entry = comfy.run(_upsample_prompt(hf_text_encoders[kind], with_images))
    assert history_error(entry) is None, history_error(entry)
    (text,) = entry["outputs"]["show"]["text"]
    assert isinstance(text, str)


def test_upsampling_with_an_encoder_only_file_says_what_to_use(comfy):
    """ComfyUI's single-file text encoders carry no language-model head: a clear error, not a crash."""
    err = history_error(comfy.run(_upsample_prompt("qwen_3_4b.safetensors", False)))
    assert err is not None and err["node_type"] == "Flux2LocalEncodePrompt"
    assert err["exception_type"] == "Flux2Local.Flux2LocalError"
    assert "qwen_3_4b.safetensors" in err["exception_message"] and "Fix:" in err["exception_message"]


def test_diffusers_transformer_folder_is_listed_and_loads(comfy):
    from flux2_core.tiny.transformer import write_tiny_transformer

    root = comfy.base / "models" / "diffusion_models"
    write_tiny_transformer(
        root, variant="klein-4b", layout="diffusers", seed=9
    )  # root/flux-2-klein-4b/transformer/
    # The tiny transformer writer's text width may differ from the tiny Qwen3's: only list + load here.
    options = comfy.get_json("/object_info/Flux2LocalModelLoader")["Flux2LocalModelLoader"]["input"][
        "required"
    ]
    assert "flux-2-klein-4b/transformer/" in options["model_name"][1]["options"]
    prompt = {
        "m": {
            "class_type": "Flux2LocalModelLoader",
            "inputs": {
                "model_name": "flux-2-klein-4b/transformer/",
                "dtype": "bf16",
                "keep_fp8": True,
                "vram_budget_gb": 0.0,
                "pinned_ram_gb": 0.0,
            },
        },
        "show": {"class_type": "PreviewAny", "inputs": {"source": ["m", 1]}},
    }
    entry = comfy.run(prompt)
    assert history_error(entry) is None, history_error(entry)
    (info,) = entry["outputs"]["show"]["text"]
    assert "diffusers folder" in info and "2 double + 2 single blocks" in info


@pytest.mark.parametrize(
    "model_file",
    ["flux-2-klein-9b.safetensors", "flux-2-klein-base-9b.safetensors", "flux-2-klein-9b-kv.safetensors"],
)
def test_multi_reference_on_the_9b_variants(comfy, model_file):
    """The 9B family (Qwen3-8B encoder), including the KV-cached reference path of 9B-KV."""
    prompt = shrink(load(WORKFLOWS / "flux2_multi_reference.api.json"), width=128, height=128, steps=2)
    nodes_of(prompt, "Flux2LocalModelLoader")[0]["inputs"]["model_name"] = model_file
    nodes_of(prompt, "Flux2LocalTextEncoderLoader")[0]["inputs"]["text_encoder_name"] = (
        "qwen_3_8b.safetensors"
    )
    nodes_of(prompt, "Flux2LocalSampler")[0]["inputs"]["guidance"] = 0.0  # the variant's default
    entry = comfy.run(prompt)
    assert history_error(entry) is None, history_error(entry)
    (img,) = history_images(entry)
    pixels = decode_png(comfy.view(img))
    assert pixels.shape == (128, 128, 3) and pixels.std() > 1e-3
