"""Inputs a careless or hostile client can send through /prompt: each gets the pack's clear message.

JSON allows NaN, and ComfyUI's range check (``value < min``) lets it through; a literal where a
socket belongs reaches the node as is; text may hold lone UTF-16 surrogates. None of these may
end in a raw Python exception, a black "successful" image or a crashed server.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from comfy_helpers import WORKFLOWS, load, nodes_of, shrink
from comfy_server import history_error, history_images

KLEIN = WORKFLOWS / "flux2_klein_4b_text_to_image.api.json"
MULTI = WORKFLOWS / "flux2_multi_reference.api.json"
NAN = float("nan")


def _node(prompt: dict, class_type: str) -> dict:
    return nodes_of(prompt, class_type)[0]["inputs"]


def _clean_error(comfy, prompt, node_type: str, *needles: str) -> str:
    status, body = comfy.queue_prompt(prompt)
    assert status == 200, f"ComfyUI refused the prompt itself ({status}): {json.dumps(body)[:2000]}"
    entry = comfy.wait_history(body["prompt_id"])
    err = history_error(entry)
    assert err is not None, f"expected an error, got {entry['status']} with images {history_images(entry)}"
    assert err["node_type"] == node_type, err
    assert err["exception_type"] == "Flux2Local.Flux2LocalError", err
    for needle in needles:
        assert needle in err["exception_message"], (needle, err["exception_message"])
    # still serving
    ok = comfy.run(shrink(load(KLEIN), width=64, height=64))
    assert ok["status"]["status_str"] == "success", history_error(ok)
    return err["exception_message"]


@pytest.mark.parametrize(
    ("workflow", "class_type", "name"),
    [
        (KLEIN, "Flux2LocalSampler", "guidance"),
        (KLEIN, "Flux2LocalSampler", "denoise"),
        (MULTI, "Flux2LocalMultiReference", "megapixels_per_reference"),
        (KLEIN, "Flux2LocalModelLoader", "vram_budget_gb"),
        (KLEIN, "Flux2LocalModelLoader", "pinned_ram_gb"),
    ],
)
def test_nan_settings_are_refused_by_name(comfy, workflow, class_type, name):
    prompt = shrink(load(workflow), width=64, height=64)
    _node(prompt, class_type)[name] = NAN
    _clean_error(comfy, prompt, class_type, name, "finite")


def test_nan_guidance_on_a_base_model_is_refused(comfy):
    """On a base model NaN would silently turn CFG off rather than give a black image."""
    prompt = shrink(load(WORKFLOWS / "flux2_klein_base_cfg.api.json"), width=64, height=64)
    _node(prompt, "Flux2LocalSampler")["guidance"] = NAN
    _clean_error(comfy, prompt, "Flux2LocalSampler", "guidance")


def test_lone_surrogate_in_the_prompt(comfy):
    prompt = shrink(load(KLEIN), width=64, height=64)
    _node(prompt, "Flux2LocalEncodePrompt")["prompt"] = "bad \ud800 text"
    _clean_error(comfy, prompt, "Flux2LocalEncodePrompt", "prompt", "surrogate")


@pytest.mark.parametrize(
    ("workflow", "class_type", "name", "source"),
    [
        (KLEIN, "Flux2LocalSampler", "model", "FLUX.2 Model Loader"),
        (KLEIN, "Flux2LocalSampler", "conditioning", "FLUX.2 Encode Prompt"),
        (KLEIN, "Flux2LocalSampler", "latent", "LATENT"),
        (KLEIN, "Flux2LocalEncodePrompt", "text_encoder", "FLUX.2 Text Encoder Loader"),
        (KLEIN, "Flux2LocalVAEDecode", "vae", "FLUX.2 VAE Loader"),
        (KLEIN, "Flux2LocalVAEDecode", "samples", "LATENT"),
        (MULTI, "Flux2LocalMultiReference", "conditioning", "FLUX.2 Encode Prompt"),
        (MULTI, "Flux2LocalMultiReference", "images.image_2", "IMAGE"),
    ],
)
def test_a_literal_in_a_socket_input(comfy, workflow, class_type, name, source):
    prompt = shrink(load(workflow), width=64, height=64)
    _node(prompt, class_type)[name] = 5
    _clean_error(comfy, prompt, class_type, name.removeprefix("images."), source)


def test_a_literal_image_for_vae_encode(comfy):
    prompt = shrink(load(KLEIN), width=64, height=64)
    prompt["31"] = {
        "class_type": "Flux2LocalVAEEncode",
        "inputs": {"vae": ["3", 0], "pixels": "x", "tiling": "auto"},
    }
    _node(prompt, "Flux2LocalSampler")["latent"] = ["31", 0]
    _clean_error(comfy, prompt, "Flux2LocalVAEEncode", "pixels", "IMAGE")


def test_truncated_tokenizer_json_names_the_file(comfy):
    src = Path(os.environ["FLUX2LOCAL_ASSETS"]) / "qwen3-tokenizer" / "tokenizer.json"
    folder = comfy.base / "models" / "text_encoders" / "tok-truncated"
    folder.mkdir(exist_ok=True)
    data = src.read_bytes()
    (folder / "tokenizer.json").write_bytes(data[: len(data) // 2])
    prompt = shrink(load(KLEIN), width=64, height=64)
    _node(prompt, "Flux2LocalTextEncoderLoader")["tokenizer"] = "tok-truncated/"
    _clean_error(comfy, prompt, "Flux2LocalTextEncoderLoader", str(folder / "tokenizer.json"))


@pytest.fixture(scope="module")
def wide_klein(comfy) -> str:
    """A tiny klein-4b whose text width (288) no tiny encoder has (they all give 3 x 64 = 192)."""
    from flux2_core.tiny.transformer import write_tiny_transformer

    name = "wide-text-klein-4b.safetensors"
    write_tiny_transformer(
        comfy.base / "models" / "diffusion_models" / name,
        variant="klein-4b",
        layout="comfyui",
        context_dim=288,
    )
    return name


@pytest.mark.parametrize(
    ("model", "encoder"),
    [
        ("flux-2-klein-4b.safetensors", "mistral_3_small_flux2_bf16.safetensors"),
        ("flux2-dev.safetensors", "qwen_3_4b.safetensors"),
        ("WIDE", "qwen_3_4b.safetensors"),
    ],
    ids=["klein-with-mistral", "dev-with-qwen3", "other-text-width"],
)
def test_model_and_encoder_mismatch_is_refused_naming_both_files(comfy, wide_klein, model, encoder):
    model = wide_klein if model == "WIDE" else model
    prompt = shrink(load(KLEIN), width=64, height=64)
    _node(prompt, "Flux2LocalModelLoader")["model_name"] = model
    _node(prompt, "Flux2LocalTextEncoderLoader")["text_encoder_name"] = encoder
    start = len(comfy.log_path.read_text(errors="replace"))
    _clean_error(comfy, prompt, "Flux2LocalSampler", model, encoder)
    # refused before any transformer work: no sampling was started
    assert (
        "Flux2Local: sampling"
        not in comfy.log_path.read_text(errors="replace")[start:].split("Prompt executed")[0]
    )
