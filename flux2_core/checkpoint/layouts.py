"""Checkpoint layouts of the FLUX.2 transformer: prefixes, the diffusers key map (as data), and
recognising files that are not a FLUX.2 transformer at all.

The diffusers map: each BFL name maps to one diffusers name, or to three names whose tensors are the
thirds of a fused qkv (dim 0), or to one name whose two halves are swapped (the final layer stores
(scale, shift) in diffusers but (shift, scale) in BFL files).
"""

from __future__ import annotations

import re

import torch

PREFIXES = ("model.diffusion_model.", "diffusion_model.")

_TOP = {
    "img_in.weight": "x_embedder.weight",
    "txt_in.weight": "context_embedder.weight",
    "time_in.in_layer.weight": "time_guidance_embed.timestep_embedder.linear_1.weight",
    "time_in.out_layer.weight": "time_guidance_embed.timestep_embedder.linear_2.weight",
    "guidance_in.in_layer.weight": "time_guidance_embed.guidance_embedder.linear_1.weight",
    "guidance_in.out_layer.weight": "time_guidance_embed.guidance_embedder.linear_2.weight",
    "double_stream_modulation_img.lin.weight": "double_stream_modulation_img.linear.weight",
    "double_stream_modulation_txt.lin.weight": "double_stream_modulation_txt.linear.weight",
    "single_stream_modulation.lin.weight": "single_stream_modulation.linear.weight",
    "final_layer.linear.weight": "proj_out.weight",
    "final_layer.adaLN_modulation.1.weight": "norm_out.linear.weight",  # halves swapped
}
SWAPPED = frozenset({"final_layer.adaLN_modulation.1.weight"})

_DOUBLE = {  # double_blocks.{i}.<bfl> -> transformer_blocks.{i}.<diffusers>
    "img_attn.qkv.weight": ("attn.to_q.weight", "attn.to_k.weight", "attn.to_v.weight"),
    "txt_attn.qkv.weight": ("attn.add_q_proj.weight", "attn.add_k_proj.weight", "attn.add_v_proj.weight"),
    "img_attn.norm.query_norm.scale": "attn.norm_q.weight",
    "img_attn.norm.key_norm.scale": "attn.norm_k.weight",
    "img_attn.proj.weight": "attn.to_out.0.weight",
    "txt_attn.norm.query_norm.scale": "attn.norm_added_q.weight",
    "txt_attn.norm.key_norm.scale": "attn.norm_added_k.weight",
    "txt_attn.proj.weight": "attn.to_add_out.weight",
    "img_mlp.0.weight": "ff.linear_in.weight",
    "img_mlp.2.weight": "ff.linear_out.weight",
    "txt_mlp.0.weight": "ff_context.linear_in.weight",
    "txt_mlp.2.weight": "ff_context.linear_out.weight",
}
_SINGLE = {  # single_blocks.{i}.<bfl> -> single_transformer_blocks.{i}.<diffusers>
    "linear1.weight": "attn.to_qkv_mlp_proj.weight",
    "linear2.weight": "attn.to_out.weight",
    "norm.query_norm.scale": "attn.norm_q.weight",
    "norm.key_norm.scale": "attn.norm_k.weight",
}

Source = str | tuple[str, ...]


def _count(keys, prefix: str) -> int:
    pat = re.compile(re.escape(prefix) + r"(\d+)\.")
    idx = {int(m.group(1)) for k in keys if (m := pat.match(k))}
    return max(idx) + 1 if idx else 0


def diffusers_key_map(diffusers_keys) -> dict[str, Source]:
    """BFL name -> diffusers source name(s) for every BFL tensor the diffusers keys can provide."""
    keys = set(diffusers_keys)
    out: dict[str, Source] = {b: d for b, d in _TOP.items() if d in keys}
    for i in range(_count(keys, "transformer_blocks.")):
        for b, d in _DOUBLE.items():
            out[f"double_blocks.{i}.{b}"] = (
                tuple(f"transformer_blocks.{i}.{x}" for x in d)
                if isinstance(d, tuple)
                else f"transformer_blocks.{i}.{d}"
            )
    for i in range(_count(keys, "single_transformer_blocks.")):
        for b, d in _SINGLE.items():
            out[f"single_blocks.{i}.{b}"] = f"single_transformer_blocks.{i}.{d}"
    return out


def swap_halves(t: torch.Tensor) -> torch.Tensor:
    a, b = t.chunk(2, dim=0)
    return torch.cat((b, a), dim=0)


def bfl_to_diffusers(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Convert a BFL-named state dict to diffusers names (used to write diffusers-layout files)."""
    out: dict[str, torch.Tensor] = {}
    for k, t in sd.items():
        if k in _TOP:
            out[_TOP[k]] = swap_halves(t) if k in SWAPPED else t
            continue
        m = re.match(r"(double|single)_blocks\.(\d+)\.(.+)$", k)
        if m is None:
            raise KeyError(f"no diffusers name for '{k}'")
        kind, i, rest = m.groups()
        if kind == "double":
            d = _DOUBLE[rest]
            if isinstance(d, tuple):
                for name, part in zip(d, t.chunk(3, dim=0)):
                    out[f"transformer_blocks.{i}.{name}"] = part
            else:
                out[f"transformer_blocks.{i}.{d}"] = t
        else:
            out[f"single_transformer_blocks.{i}.{_SINGLE[rest]}"] = t
    return out


def strip_prefix(keys) -> tuple[str, list[str]]:
    """Remove a ComfyUI-style prefix shared by the transformer keys. Returns (prefix, stripped keys)."""
    keys = list(keys)
    for p in PREFIXES:
        if any(k.startswith(p) for k in keys):
            return p, [k[len(p) :] for k in keys if k.startswith(p)]
    return "", keys


def is_flux2_bfl(keys) -> bool:
    return (
        "double_stream_modulation_img.lin.weight" in keys
        or "img_in.weight" in keys
        and ("single_stream_modulation.lin.weight" in keys)
    )


def is_flux2_diffusers(keys) -> bool:
    return "x_embedder.weight" in keys and "double_stream_modulation_img.linear.weight" in keys


_NOT_FLUX2 = (  # (test on the raw key set, what the file is, fix)
    (
        lambda ks: (
            "double_blocks.0.img_mod.lin.weight" in ks
            or "vector_in.in_layer.weight" in ks
            or any(k.endswith("double_blocks.0.img_mod.lin.weight") for k in ks)
        ),
        "a FLUX.1 transformer",
        "FLUX.1 files need ComfyUI's own 'Load Diffusion Model' node.",
    ),
    (
        lambda ks: (
            "time_text_embed.timestep_embedder.linear_1.weight" in ks
            or any(k.endswith("norm1.linear.weight") and k.startswith("transformer_blocks.") for k in ks)
        ),
        "a FLUX.1 (diffusers) transformer",
        "FLUX.1 files need ComfyUI's own loaders.",
    ),
    (
        lambda ks: any("input_blocks.0.0.weight" in k or k.startswith("conditioner.embedders.") for k in ks),
        "a Stable Diffusion / SDXL checkpoint",
        "Use ComfyUI's 'Load Checkpoint' node for SD/SDXL models.",
    ),
    (
        lambda ks: (
            "bn.running_mean" in ks
            or any(k.startswith(("encoder.conv_in.", "decoder.conv_in.", "first_stage_model.")) for k in ks)
        ),
        "a VAE",
        "Load it with the FLUX.2 VAE loader, and pick a flux2-dev / flux-2-klein transformer here.",
    ),
    (
        lambda ks: any(
            k.startswith(
                (
                    "text_encoders.",
                    "model.layers.",
                    "model.language_model.",
                    "language_model.",
                    "model.embed_tokens.",
                    "text_model.",
                    "encoder.block.",
                    "shared.",
                    "transformer.resblocks.",
                )
            )
            for k in ks
        ),
        "a text encoder",
        "Load it with the FLUX.2 text-encoder loader; this loader takes the transformer.",
    ),
)


def describe_non_flux2(keys) -> tuple[str, str] | None:
    """(what the file is, how to fix) when the keys belong to a known non-FLUX.2 model, else None."""
    ks = set(keys)
    for test, what, fix in _NOT_FLUX2:
        if test(ks):
            return what, fix
    return None
