"""Tiny random FLUX.2 transformers written in every published checkpoint layout.

Used by the tests, the node tests and the demo when no real weights exist. Heads keep the real head
dim 128 (2 heads = hidden 256) so ComfyUI's own model detection accepts the files.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..checkpoint.layouts import bfl_to_diffusers
from ..config import Flux2Config, bfl_shapes, is_block_linear
from ..quant.fp8 import quantize_fp8
from ..quant.nvfp4 import quantize_nvfp4

VARIANTS = ("dev", "klein-4b", "klein-9b", "klein-base-4b", "klein-base-9b", "klein-9b-kv")
LAYOUTS = ("bfl", "comfyui", "diffusers", "bfl-fp8", "comfy-fp8", "comfy-scaled-fp8", "nvfp4")

# Real file names per variant (the loader reads distilled-vs-base and KV from the name).
FILE_NAMES = {
    "dev": "flux2-dev",
    "klein-4b": "flux-2-klein-4b",
    "klein-9b": "flux-2-klein-9b",
    "klein-base-4b": "flux-2-klein-base-4b",
    "klein-base-9b": "flux-2-klein-base-9b",
    "klein-9b-kv": "flux-2-klein-9b-kv",
}
COMFY_PREFIX = "model.diffusion_model."


def tiny_config(
    variant: str = "klein-4b", depth: int = 2, depth_single: int = 2, context_dim: int | None = None
) -> Flux2Config:
    """A small config keeping the variant's flags: hidden 256 (2 heads of 128), context 96 (dev) / 64."""
    preset = Flux2Config.from_name(variant)
    ctx = context_dim or (96 if preset.guidance_embed else 64)
    return preset.replace(
        variant="custom",
        hidden_size=256,
        num_heads=2,
        depth=depth,
        depth_single=depth_single,
        context_dim=ctx,
    )


def random_bfl_state_dict(config: Flux2Config, seed: int = 0, dtype: torch.dtype = torch.float32):
    """Random BFL-named weights: linears ~ N(0, 1/fan_in), QK-norm scales ~ 1 + N(0, 0.1)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, shape in bfl_shapes(config).items():
        if k.endswith(".scale"):
            t = 1 + 0.1 * torch.randn(shape, generator=g)
        else:
            t = torch.randn(shape, generator=g) / math.sqrt(shape[1])
        out[k] = t.to(dtype)
    return out


def quantize_layout(sd: dict[str, torch.Tensor], layout: str) -> dict[str, torch.Tensor]:
    """A BFL state dict with its block linears quantized as ``layout`` stores them.

    Args:
        sd: BFL names -> weights (any float dtype).
        layout: "bfl-fp8" / "comfy-fp8" (per-tensor FP8 + weight and input scales; ComfyUI's files add
            a ``comfy_quant`` marker), "comfy-scaled-fp8" (ComfyUI's legacy names) or "nvfp4".

    Returns:
        The entries of the file: unchanged tensors, quantized weights and their scales.
    """
    out: dict[str, torch.Tensor] = {}
    for k, w in sd.items():
        if not is_block_linear(k):
            out[k] = w
            continue
        layer = k[: -len(".weight")]
        if layout == "nvfp4":
            q, block_scale, global_scale = quantize_nvfp4(w.float())
            out[k], out[layer + ".weight_scale"], out[layer + ".weight_scale_2"] = (
                q,
                block_scale,
                global_scale,
            )
            continue
        q, scale = quantize_fp8(w.float())
        input_scale = torch.tensor(0.05, dtype=torch.float32)
        out[k] = q
        if layout == "comfy-scaled-fp8":  # legacy ComfyUI names
            out[layer + ".scale_weight"] = scale
            out[layer + ".scale_input"] = input_scale
        else:
            out[layer + ".weight_scale"] = scale
            out[layer + ".input_scale"] = input_scale
            if layout == "comfy-fp8":
                conf = json.dumps({"format": "float8_e4m3fn"}).encode()
                out[layer + ".comfy_quant"] = torch.tensor(list(conf), dtype=torch.uint8)
    if layout == "comfy-scaled-fp8":
        out["scaled_fp8"] = torch.empty(0, dtype=torch.float8_e4m3fn)
    return out


def write_tiny_transformer(
    path: str | os.PathLike,
    variant: str = "klein-4b",
    layout: str = "bfl",
    dtype: torch.dtype = torch.bfloat16,
    seed: int = 0,
    depth: int = 2,
    depth_single: int = 2,
    context_dim: int | None = None,
) -> Path:
    """Write a tiny random transformer of ``variant`` in ``layout``.

    Args:
        path: a folder; the file (or diffusers pipeline folder) gets the variant's real name in it,
            e.g. ``<path>/flux-2-klein-4b.safetensors``, ``<path>/flux-2-klein-4b-fp8.safetensors`` or
            ``<path>/flux-2-klein-4b/`` (diffusers). A path ending in ``.safetensors`` is used as the
            file name itself (keep the variant's words "base" / "kv" in it: the loader reads them).
        variant: one of ``VARIANTS``.
        layout: one of ``LAYOUTS``: "bfl", "comfyui" (prefixed), "diffusers" (pipeline folder with a
            sharded ``transformer/``), "bfl-fp8", "comfy-fp8" (``comfy_quant`` + header
            ``_quantization_metadata``), "comfy-scaled-fp8" (legacy ``scaled_fp8``), "nvfp4".
        dtype: dtype of the unquantized tensors.
        seed: weight seed.
        depth, depth_single: block counts.
        context_dim: text feature width (match the tiny text encoder: 3 x its hidden size).

    Returns:
        The written file, or the pipeline folder for "diffusers".
    """
    if variant not in VARIANTS or layout not in LAYOUTS:
        raise ValueError(f"variant must be one of {VARIANTS}, layout one of {LAYOUTS}")
    config = tiny_config(variant, depth, depth_single, context_dim)
    sd = random_bfl_state_dict(config, seed, dtype)
    path = Path(path)
    name = FILE_NAMES[variant]
    if layout == "diffusers":
        return _write_diffusers(path / name, variant, sd, config)
    suffix = {
        "bfl-fp8": "-fp8",
        "comfy-fp8": "_fp8mixed",
        "comfy-scaled-fp8": "_fp8_scaled",
        "nvfp4": "-nvfp4",
    }
    file = path if path.suffix == ".safetensors" else path / f"{name}{suffix.get(layout, '')}.safetensors"
    file.parent.mkdir(parents=True, exist_ok=True)
    metadata = None
    if layout in ("bfl-fp8", "comfy-fp8", "comfy-scaled-fp8", "nvfp4"):
        sd = quantize_layout(sd, layout)
        if layout in ("bfl-fp8", "comfy-fp8", "nvfp4"):
            fmt = "nvfp4" if layout == "nvfp4" else "float8_e4m3fn"
            layers = {k[: -len(".weight")]: {"format": fmt} for k in sd if is_block_linear(k)}
            metadata = {"_quantization_metadata": json.dumps({"format_version": "1.0", "layers": layers})}
    if layout in ("comfyui", "comfy-fp8", "comfy-scaled-fp8"):
        sd = {COMFY_PREFIX + k: v for k, v in sd.items()}
    save_file({k: v.contiguous() for k, v in sd.items()}, str(file), metadata=metadata)
    return file


def _write_diffusers(folder: Path, variant: str, sd: dict[str, torch.Tensor], cfg: Flux2Config) -> Path:
    """A pipeline folder: ``model_index.json`` + ``transformer/`` (two shards, index JSON, config)."""
    tdir = folder / "transformer"
    tdir.mkdir(parents=True, exist_ok=True)
    dsd = bfl_to_diffusers(sd)
    keys = sorted(dsd)
    half = len(keys) // 2
    shards = {
        "diffusion_pytorch_model-00001-of-00002.safetensors": keys[:half],
        "diffusion_pytorch_model-00002-of-00002.safetensors": keys[half:],
    }
    weight_map = {}
    for fname, ks in shards.items():
        save_file({k: dsd[k].contiguous() for k in ks}, str(tdir / fname))
        weight_map.update(dict.fromkeys(ks, fname))
    index = {
        "metadata": {"total_size": sum(t.numel() * t.element_size() for t in dsd.values())},
        "weight_map": weight_map,
    }
    (tdir / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index, indent=1))
    (tdir / "config.json").write_text(
        json.dumps(
            {
                "_class_name": "Flux2Transformer2DModel",
                "in_channels": 128,
                "num_layers": cfg.depth,
                "num_single_layers": cfg.depth_single,
                "num_attention_heads": cfg.num_heads,
                "attention_head_dim": 128,
                "joint_attention_dim": cfg.context_dim,
                "guidance_embeds": cfg.guidance_embed,
            },
            indent=1,
        )
    )
    index_json = {"_class_name": "Flux2Pipeline" if variant == "dev" else "Flux2KleinPipeline"}
    if variant != "dev":
        index_json["is_distilled"] = "base" not in variant
    (folder / "model_index.json").write_text(json.dumps(index_json, indent=1))
    return folder
