"""Our nodes against ComfyUI's native FLUX.2 on the same tiny random checkpoint, embeddings and VAE.

Native path: UNETLoader -> BasicGuider/CFGGuider, RandomNoise, KSamplerSelect(euler),
Flux2Scheduler, EmptyFlux2LatentImage -> SamplerCustomAdvanced; VAELoader -> VAEDecode.
Ours: FLUX.2 Model Loader -> FLUX.2 Sampler; FLUX.2 VAE Loader -> FLUX.2 VAE Decode.
Latents are compared for three variants; the decoders are compared on the same latents (equal
latents + equal decoders = equal images, without paying for two full-size decodes per case).

Conditioning: ComfyUI's CLIPLoader (type flux2) recognises Mistral/Qwen3 only at their real sizes,
so it cannot load the tiny random text encoders. Both paths therefore get the embeddings FLUX.2
Encode Prompt produced (the test-only bridge node in bridge_pack/ wraps them as a native
CONDITIONING). Latents are compared through SaveLatent files, images through SaveImage PNGs.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from comfy_helpers import decode_png
from comfy_server import history_error, history_images
from safetensors.torch import load_file

W, H, STEPS, SEED = 128, 96, 4, 7
FULL_VAE = "flux2-vae-fullsize-random.safetensors"


@pytest.fixture(scope="module")
def full_size_vae(comfy) -> str:
    """A random VAE at the published size: ComfyUI's VAELoader hard-codes FLUX.2's widths (128 base
    channels, 2 ResNet blocks per level), so it cannot load the tiny one the rest of the suite uses."""
    from flux2_core.tiny.vae import write_tiny_vae
    from flux2_core.vae import Flux2VAEConfig

    path = comfy.base / "models" / "vae" / FULL_VAE
    if not path.exists():
        write_tiny_vae(
            path, layout="comfyui", seed=3, config=Flux2VAEConfig.from_name("flux2"), dtype=torch.bfloat16
        )
    return FULL_VAE


def _graph(
    model_file: str, te_file: str, vae_file: str, guidance: float, cfg: bool, tag: str, decode: bool
) -> dict:
    g = {
        "te": {
            "class_type": "Flux2LocalTextEncoderLoader",
            "inputs": {"text_encoder_name": te_file, "tokenizer": "auto", "dtype": "fp32"},
        },
        "enc": {
            "class_type": "Flux2LocalEncodePrompt",
            "inputs": {
                "text_encoder": ["te", 0],
                "prompt": "a small red cube on a table",
                "negative_prompt": "blurry",
                "upsample_prompt": False,
                "upsample_seed": 0,
                "upsample_max_tokens": 512,
            },
        },
        "vae": {"class_type": "Flux2LocalVAELoader", "inputs": {"vae_name": vae_file, "dtype": "fp32"}},
        # ours
        "m": {
            "class_type": "Flux2LocalModelLoader",
            "inputs": {
                "model_name": model_file,
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
        "d": {
            "class_type": "Flux2LocalVAEDecode",
            "inputs": {"vae": ["vae", 0], "samples": ["s", 0], "tiling": "off"},
        },
        "save_ours": {
            "class_type": "SaveImage",
            "inputs": {"images": ["d", 0], "filename_prefix": f"ours_{tag}"},
        },
        "lat_ours": {
            "class_type": "SaveLatent",
            "inputs": {"samples": ["s", 0], "filename_prefix": f"latents/ours_{tag}"},
        },
        # native
        "un": {"class_type": "UNETLoader", "inputs": {"unet_name": model_file, "weight_dtype": "default"}},
        "pos": {
            "class_type": "Flux2LocalTestToNativeConditioning",
            "inputs": {"conditioning": ["enc", 0], "guidance": guidance, "negative": False},
        },
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
        "nvae": {"class_type": "VAELoader", "inputs": {"vae_name": vae_file}},
        "lat_native": {
            "class_type": "SaveLatent",
            "inputs": {"samples": ["sca", 0], "filename_prefix": f"latents/native_{tag}"},
        },
        # native VAE decode of OUR latents: isolates the VAE from the sampler
        "nd_ours": {"class_type": "VAEDecode", "inputs": {"samples": ["s", 0], "vae": ["nvae", 0]}},
        "save_native_vae": {
            "class_type": "SaveImage",
            "inputs": {"images": ["nd_ours", 0], "filename_prefix": f"nativevae_{tag}"},
        },
    }
    if decode:  # VAE encode too: the same 96x64 picture through our VAE Encode and native VAEEncode
        g["img"] = {"class_type": "LoadImage", "inputs": {"image": "flux2_reference_1.png"}}
        g["e_ours"] = {
            "class_type": "Flux2LocalVAEEncode",
            "inputs": {"vae": ["vae", 0], "pixels": ["img", 0], "tiling": "off"},
        }
        g["e_native"] = {"class_type": "VAEEncode", "inputs": {"pixels": ["img", 0], "vae": ["nvae", 0]}}
        g["lat_e_ours"] = {
            "class_type": "SaveLatent",
            "inputs": {"samples": ["e_ours", 0], "filename_prefix": f"latents/encours_{tag}"},
        }
        g["lat_e_native"] = {
            "class_type": "SaveLatent",
            "inputs": {"samples": ["e_native", 0], "filename_prefix": f"latents/encnative_{tag}"},
        }
    else:  # the VAE is compared once (dev); the other cases compare latents only
        for k in ("d", "save_ours", "nd_ours", "save_native_vae", "vae"):
            del g[k]
    if cfg:
        g["neg"] = {
            "class_type": "Flux2LocalTestToNativeConditioning",
            "inputs": {"conditioning": ["enc", 0], "guidance": guidance, "negative": True},
        }
        g["guider"] = {
            "class_type": "CFGGuider",
            "inputs": {"model": ["un", 0], "positive": ["pos", 0], "negative": ["neg", 0], "cfg": guidance},
        }
    else:
        g["guider"] = {
            "class_type": "BasicGuider",
            "inputs": {"model": ["un", 0], "conditioning": ["pos", 0]},
        }
    return g


def _latent(comfy, prefix: str) -> torch.Tensor:
    files = sorted((comfy.base / "output" / "latents").glob(f"{prefix}_*.latent"))
    assert files, f"no latent saved for {prefix}"
    return load_file(str(files[-1]))["latent_tensor"].float()


def _image(comfy, entry, prefix: str) -> np.ndarray:
    (img,) = [i for i in history_images(entry) if i["filename"].startswith(prefix + "_")]
    return decode_png(comfy.view(img))


@pytest.mark.parametrize(
    ("model_file", "te_file", "guidance", "cfg"),
    [
        ("flux2-dev.safetensors", "mistral_3_small_flux2_bf16.safetensors", 4.0, False),  # embedded guidance
        ("flux-2-klein-4b.safetensors", "qwen_3_4b.safetensors", 1.0, False),  # distilled, ComfyUI layout
        ("flux-2-klein-base-4b.safetensors", "qwen_3_4b.safetensors", 3.5, True),  # base with CFG
    ],
    ids=["dev", "klein-4b", "klein-base-cfg"],
)
def test_same_latents_and_images_as_native(comfy, full_size_vae, model_file, te_file, guidance, cfg):
    tag = model_file.split(".")[0].replace("-", "_")
    decode = model_file == "flux2-dev.safetensors"
    entry = comfy.run(_graph(model_file, te_file, full_size_vae, guidance, cfg, tag, decode))
    assert history_error(entry) is None, history_error(entry)
    ours, native = _latent(comfy, f"ours_{tag}"), _latent(comfy, f"native_{tag}")
    assert ours.shape == native.shape == (1, 128, H // 16, W // 16)
    assert ours.std() > 0.1
    torch.testing.assert_close(ours, native, rtol=1e-3, atol=1e-3)
    if decode:
        # Same latents through our VAE decode and ComfyUI's VAEDecode; 8-bit PNGs: one step of rounding.
        img_ours, img_native = _image(comfy, entry, f"ours_{tag}"), _image(comfy, entry, f"nativevae_{tag}")
        assert img_ours.shape == (H, W, 3)
        assert img_ours.std() > 1e-3
        np.testing.assert_allclose(img_ours, img_native, atol=1.5 / 255)
        enc_ours, enc_native = _latent(comfy, f"encours_{tag}"), _latent(comfy, f"encnative_{tag}")
        assert enc_ours.shape == (1, 128, 4, 6)
        torch.testing.assert_close(enc_ours, enc_native, rtol=1e-3, atol=1e-3)
