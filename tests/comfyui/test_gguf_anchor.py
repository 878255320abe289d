"""Anchor: the same tiny GGUF through city96's ComfyUI-GGUF (its Unet Loader and ops, ComfyUI's
native FLUX.2 sampling) and through our loader and sampler gives the same latents.

The GGUF's block scales are powers of two with capped ranges, so ComfyUI-GGUF's float16
dequantization is exact and both paths compute with the same float32 weights; any difference is
how the files are read (names, reversed dims, types, prefixes), which is what this test checks.
"""

from __future__ import annotations

import pytest
import torch
from comfy_helpers import comfyui_gguf_missing
from comfy_server import history_error
from safetensors.torch import load_file

W, H, STEPS, SEED = 128, 96, 3, 11


def _graph(gguf_name: str, te_file: str, guidance: float, tag: str) -> dict:
    return {
        "te": {
            "class_type": "Flux2LocalTextEncoderLoader",
            "inputs": {"text_encoder_name": te_file, "tokenizer": "auto", "dtype": "fp32"},
        },
        "enc": {
            "class_type": "Flux2LocalEncodePrompt",
            "inputs": {
                "text_encoder": ["te", 0],
                "prompt": "a lighthouse on a cliff at dusk",
                "negative_prompt": "",
                "upsample_prompt": False,
                "upsample_seed": 0,
                "upsample_max_tokens": 512,
            },
        },
        "m": {
            "class_type": "Flux2LocalModelLoader",
            "inputs": {
                "model_name": gguf_name,
                "dtype": "fp32",
                "keep_fp8": True,
                "vram_budget_gb": 0.0,
                "pinned_ram_gb": 0.0,
            },
        },
        "s": {
            "class_type": "Flux2LocalSampler",
            "inputs": {
                "model": ["m", 0],
                "conditioning": ["enc", 0],
                "width": W,
                "height": H,
                "seed": SEED,
                "steps": STEPS,
                "guidance": guidance,
                "denoise": 1.0,
            },
        },
        "lat_ours": {
            "class_type": "SaveLatent",
            "inputs": {"samples": ["s", 0], "filename_prefix": f"latents/gguf_ours_{tag}"},
        },
        # ComfyUI-GGUF's own loader, then ComfyUI's native FLUX.2 sampling
        "un": {"class_type": "UnetLoaderGGUF", "inputs": {"unet_name": gguf_name}},
        "pos": {
            "class_type": "Flux2LocalTestToNativeConditioning",
            "inputs": {"conditioning": ["enc", 0], "guidance": guidance, "negative": False},
        },
        "guider": {"class_type": "BasicGuider", "inputs": {"model": ["un", 0], "conditioning": ["pos", 0]}},
        "noise": {"class_type": "RandomNoise", "inputs": {"noise_seed": SEED}},
        "ks": {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "euler"}},
        "sch": {"class_type": "Flux2Scheduler", "inputs": {"steps": STEPS, "width": W, "height": H}},
        "empty": {
            "class_type": "EmptyFlux2LatentImage",
            "inputs": {"width": W, "height": H, "batch_size": 1},
        },
        "sca": {
            "class_type": "SamplerCustomAdvanced",
            "inputs": {
                "noise": ["noise", 0],
                "guider": ["guider", 0],
                "sampler": ["ks", 0],
                "sigmas": ["sch", 0],
                "latent_image": ["empty", 0],
            },
        },
        "lat_native": {
            "class_type": "SaveLatent",
            "inputs": {"samples": ["sca", 0], "filename_prefix": f"latents/gguf_native_{tag}"},
        },
    }


def _latent(comfy, prefix: str) -> torch.Tensor:
    files = sorted((comfy.base / "output" / "latents").glob(f"{prefix}_*.latent"))
    assert files, f"no latent saved for {prefix}"
    return load_file(str(files[-1]))["latent_tensor"].float()


@pytest.mark.parametrize(
    ("variant", "mix", "prefix", "te_file", "guidance"),
    [
        ("dev", "mixed", False, "mistral_3_small_flux2_bf16.safetensors", 4.0),
        ("klein-4b", "Q4_K_M", True, "qwen_3_4b.safetensors", 1.0),
    ],
    ids=["dev-mixed", "klein-Q4_K_M-prefixed"],
)
def test_same_latents_as_comfyui_gguf(comfy, variant, mix, prefix, te_file, guidance):
    missing = comfyui_gguf_missing()
    if missing:
        pytest.fail(missing, pytrace=False)
    info = comfy.get_json("/object_info/UnetLoaderGGUF")
    assert "UnetLoaderGGUF" in info, f"ComfyUI-GGUF did not load into ComfyUI:\n{comfy.log_tail(80)}"
    from flux2_core.tiny.gguf import write_tiny_gguf_transformer

    name = f"anchor-{variant}-{mix}{'-prefixed' if prefix else ''}.gguf"
    path = comfy.base / "models" / "diffusion_models" / name
    if not path.exists():
        write_tiny_gguf_transformer(
            path, variant, mix=mix, prefix=prefix, seed=21, context_dim=192, exact_fp16=True
        )
    # the node lists the file (ComfyUI's own lists leave .gguf out)
    spec = comfy.get_json("/object_info/Flux2LocalModelLoader")["Flux2LocalModelLoader"]["input"]["required"]
    options = spec["model_name"][1]["options"] if spec["model_name"][0] == "COMBO" else spec["model_name"][0]
    assert name in options
    tag = f"{variant}_{mix}"
    entry = comfy.run(_graph(name, te_file, guidance, tag), timeout=300)
    assert history_error(entry) is None, history_error(entry)
    ours, native = _latent(comfy, f"gguf_ours_{tag}"), _latent(comfy, f"gguf_native_{tag}")
    assert ours.shape == native.shape == (1, 128, H // 16, W // 16)
    assert ours.std() > 0.1
    torch.testing.assert_close(ours, native, rtol=1e-3, atol=1e-3)
