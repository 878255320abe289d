"""FLUX.2 LoRA Loader against ComfyUI's own LoraLoaderModelOnly on its native FLUX.2 model.

One prompt runs, for each kind of LoRA naming and factorisation ComfyUI reads for FLUX.2 (BFL names,
kohya, diffusers with q/k/v slices and the swapped norm_out, LyCORIS LoHa; LyCORIS LoKr chained after
the BFL one; OneTrainer and DiffSynth differ from diffusers only by their prefix), our loader
-> FLUX.2 Sampler and native UNETLoader -> LoraLoaderModelOnly -> SamplerCustomAdvanced on the same
tiny [dev] checkpoint, embeddings (bridge node, see test_native_parity.py) and noise; the latents must
agree, and one pair decoded by the same VAE gives the same image. The base model without a LoRA runs
in the same prompt and must stay the base model (our LoRA node never changes its input).

Targets per format are the layers ComfyUI maps: BFL-named files (ai-toolkit, kohya) every linear; diffusers-named files the blocks plus x_embedder, context_embedder, proj_out and
norm_out.linear (ComfyUI's FLUX.2 diffusers map names the time and modulation layers as in FLUX.1).
ComfyUI ignores PEFT's ``lora_adapter_metadata``, so the diffusers files carry no alpha there.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from comfy_helpers import decode_png
from comfy_server import history_error, history_images
from safetensors.torch import load_file

W, H, STEPS, SEED, STRENGTH = 64, 64, 2, 5, 0.8
MODEL = "flux2-dev.safetensors"
TE = "mistral_3_small_flux2_bf16.safetensors"

# name -> (writer format, targets kind, writer options)
LORAS = {
    "ai-toolkit": ("ai-toolkit", "all", {"alpha": 3.0}),
    "kohya": ("kohya", "all", {"alpha": 2.0, "rank": 3}),
    "peft": ("peft", "comfy-diffusers", {"alpha": None}),
    "loha": ("loha", "comfy-diffusers", {"alpha": 2.0}),
    "lokr": ("lokr", "comfy-diffusers", {"alpha": 3.0}),
}
ALONE = ("ai-toolkit", "kohya", "peft", "loha")  # each on its own
STACK = ("ai-toolkit", "lokr")  # chained in both paths (LoKr is checked here only: it saves a sampling run)


def _targets(config, kind):
    from flux2_core.tiny.lora import lora_targets

    if kind == "all":
        return lora_targets(config)
    top = {"img_in", "txt_in", "final_layer.linear", "final_layer.adaLN_modulation.1"}
    return [t for t in lora_targets(config) if t.startswith(("double_blocks.", "single_blocks.")) or t in top]


@pytest.fixture(scope="module")
def lora_files(comfy) -> dict[str, str]:
    from flux2_core import load_transformer
    from flux2_core.tiny.lora import write_tiny_lora

    config = load_transformer(comfy.base / "models" / "diffusion_models" / MODEL).config
    out = {}
    for i, (name, (fmt, kind, opts)) in enumerate(LORAS.items()):
        file = f"tiny_{name}.safetensors"
        write_tiny_lora(
            comfy.base / "models" / "loras" / file,
            config,
            fmt,
            seed=40 + i,
            targets=_targets(config, kind),
            **opts,
        )
        out[name] = file
    return out


def _sampler_pair(g: dict, tag: str, ours_model: list, native_model: list) -> None:
    g[f"s_{tag}"] = {
        "class_type": "Flux2LocalSampler",
        "inputs": {
            "model": ours_model,
            "conditioning": ["enc", 0],
            "width": W,
            "height": H,
            "seed": SEED,
            "steps": STEPS,
            "guidance": 4.0,
            "denoise": 1.0,
        },
    }
    g[f"lat_ours_{tag}"] = {
        "class_type": "SaveLatent",
        "inputs": {"samples": [f"s_{tag}", 0], "filename_prefix": f"latents/lora_ours_{tag}"},
    }
    g[f"guider_{tag}"] = {
        "class_type": "BasicGuider",
        "inputs": {"model": native_model, "conditioning": ["pos", 0]},
    }
    g[f"sca_{tag}"] = {
        "class_type": "SamplerCustomAdvanced",
        "inputs": {
            "noise": ["noise", 0],
            "guider": [f"guider_{tag}", 0],
            "sampler": ["ks", 0],
            "sigmas": ["sch", 0],
            "latent_image": ["empty", 0],
        },
    }
    g[f"lat_native_{tag}"] = {
        "class_type": "SaveLatent",
        "inputs": {"samples": [f"sca_{tag}", 0], "filename_prefix": f"latents/lora_native_{tag}"},
    }


def _lora_nodes(g: dict, tag: str, file: str, ours_in: list, native_in: list) -> tuple[list, list]:
    g[f"ol_{tag}"] = {
        "class_type": "Flux2LocalLoRALoader",
        "inputs": {"model": ours_in, "lora_name": file, "strength": STRENGTH},
    }
    g[f"nl_{tag}"] = {
        "class_type": "LoraLoaderModelOnly",
        "inputs": {"model": native_in, "lora_name": file, "strength_model": STRENGTH},
    }
    return [f"ol_{tag}", 0], [f"nl_{tag}", 0]


def _ours_common(prompt: str) -> dict:
    """Text encoder, its prompt and our model loader (fp32): the part both tests' graphs share."""
    return {
        "te": {
            "class_type": "Flux2LocalTextEncoderLoader",
            "inputs": {"text_encoder_name": TE, "tokenizer": "auto", "dtype": "fp32"},
        },
        "enc": {
            "class_type": "Flux2LocalEncodePrompt",
            "inputs": {
                "text_encoder": ["te", 0],
                "prompt": prompt,
                "negative_prompt": "",
                "upsample_prompt": False,
                "upsample_seed": 0,
                "upsample_max_tokens": 512,
            },
        },
        "m": {
            "class_type": "Flux2LocalModelLoader",
            "inputs": {
                "model_name": MODEL,
                "dtype": "fp32",
                "keep_fp8": True,
                "vram_budget_gb": 0.0,
                "pinned_ram_gb": 0.0,
            },
        },
    }


def _graph(files: dict[str, str]) -> dict:
    g = _ours_common("a lighthouse at dusk") | {
        "un": {"class_type": "UNETLoader", "inputs": {"unet_name": MODEL, "weight_dtype": "default"}},
        "pos": {
            "class_type": "Flux2LocalTestToNativeConditioning",
            "inputs": {"conditioning": ["enc", 0], "guidance": 4.0, "negative": False},
        },
        "noise": {"class_type": "RandomNoise", "inputs": {"noise_seed": SEED}},
        "ks": {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "euler"}},
        "sch": {"class_type": "Flux2Scheduler", "inputs": {"steps": STEPS, "width": W, "height": H}},
        "empty": {
            "class_type": "EmptyFlux2LatentImage",
            "inputs": {"width": W, "height": H, "batch_size": 1},
        },
        "vae": {
            "class_type": "Flux2LocalVAELoader",
            "inputs": {"vae_name": "flux2-vae.safetensors", "dtype": "fp32"},
        },
    }
    _sampler_pair(g, "base", ["m", 0], ["un", 0])
    for name in ALONE:
        ours, native = _lora_nodes(g, name, files[name], ["m", 0], ["un", 0])
        _sampler_pair(g, name, ours, native)
    ours, native = ["m", 0], ["un", 0]
    for name in STACK:
        ours, native = _lora_nodes(g, f"stack_{name}", files[name], ours, native)
    _sampler_pair(g, "stack", ours, native)
    for side, sampler in (("ours", "s_peft"), ("native", "sca_peft")):  # one pair decoded: the same image
        g[f"d_{side}"] = {
            "class_type": "Flux2LocalVAEDecode",
            "inputs": {"vae": ["vae", 0], "samples": [sampler, 0], "tiling": "off"},
        }
        g[f"img_{side}"] = {
            "class_type": "SaveImage",
            "inputs": {"images": [f"d_{side}", 0], "filename_prefix": f"lora_{side}"},
        }
    return g


def _latent(comfy, prefix: str) -> torch.Tensor:
    files = sorted((comfy.base / "output" / "latents").glob(f"{prefix}_*.latent"))
    assert files, f"no latent saved for {prefix}"
    return load_file(str(files[-1]))["latent_tensor"].float()


def test_same_latents_and_image_as_native_lora_loader(comfy, lora_files):
    entry = comfy.run(_graph(lora_files), timeout=600)
    assert history_error(entry) is None, history_error(entry)
    base = _latent(comfy, "lora_ours_base")
    torch.testing.assert_close(base, _latent(comfy, "lora_native_base"), rtol=1e-3, atol=1e-3)
    for tag in [*ALONE, "stack"]:
        ours, native = _latent(comfy, f"lora_ours_{tag}"), _latent(comfy, f"lora_native_{tag}")
        assert (ours - base).abs().max() > 0.05, f"{tag}: the LoRA changed nothing"
        torch.testing.assert_close(ours, native, rtol=1e-3, atol=1e-3, msg=lambda m, tag=tag: f"{tag}: {m}")
    images = {i["filename"].split("_")[1]: decode_png(comfy.view(i)) for i in history_images(entry)}
    assert images["ours"].shape == (H, W, 3) and images["ours"].std() > 1e-3
    np.testing.assert_allclose(images["ours"], images["native"], atol=1.5 / 255)


def test_lora_for_another_model_fails_in_the_loader_node(comfy):
    from safetensors.torch import save_file

    name = "flux1_style.safetensors"
    save_file(
        {
            "lora_unet_double_blocks_0_img_mod_lin.lora_down.weight": torch.zeros(2, 256),
            "lora_unet_double_blocks_0_img_mod_lin.lora_up.weight": torch.zeros(1536, 2),
        },
        str(comfy.base / "models" / "loras" / name),
    )
    g = _ours_common("x") | {
        "l": {
            "class_type": "Flux2LocalLoRALoader",
            "inputs": {"model": ["m", 0], "lora_name": name, "strength": 1.0},
        },
        "s": {
            "class_type": "Flux2LocalSampler",
            "inputs": {
                "model": ["l", 0],
                "conditioning": ["enc", 0],
                "width": 64,
                "height": 64,
                "seed": 0,
                "steps": 1,
                "guidance": 4.0,
                "denoise": 1.0,
            },
        },
        "save": {
            "class_type": "SaveLatent",
            "inputs": {"samples": ["s", 0], "filename_prefix": "latents/never"},
        },
    }
    entry = comfy.run(g)
    err = history_error(entry)
    assert err is not None and err.get("node_type") == "Flux2LocalLoRALoader", err
    assert "FLUX.1" in err["exception_message"] and name in err["exception_message"]
    assert comfy.alive()
