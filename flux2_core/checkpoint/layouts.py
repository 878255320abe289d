"""Checkpoint layouts of the FLUX.2 transformer: the diffusers key map (as data) and the layout tests.

Recognising files that are not a FLUX.2 transformer at all is ``identify.py``'s job (one table for
every loader); prefixes and block counting are in ``keys.py``.

The diffusers map: each BFL name maps to one diffusers name, or to three names whose tensors are the
thirds of a fused qkv (dim 0), or to one name whose two halves are swapped (the final layer stores
(scale, shift) in diffusers but (shift, scale) in BFL files).
"""

from __future__ import annotations

import re

import torch

from .keys import TRANSFORMER_PREFIXES as PREFIXES
from .keys import count_blocks, strip_prefix

__all__ = [
    "PREFIXES",
    "SWAPPED",
    "bfl_to_diffusers",
    "diffusers_key_map",
    "is_flux2_bfl",
    "is_flux2_diffusers",
    "strip_prefix",
    "swap_halves",
]

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


def diffusers_key_map(diffusers_keys) -> dict[str, Source]:
    """BFL name -> diffusers source name(s) for every BFL tensor the diffusers keys can provide."""
    keys = set(diffusers_keys)
    out: dict[str, Source] = {b: d for b, d in _TOP.items() if d in keys}
    for i in range(count_blocks(keys, "transformer_blocks.")):
        for b, d in _DOUBLE.items():
            out[f"double_blocks.{i}.{b}"] = (
                tuple(f"transformer_blocks.{i}.{x}" for x in d)
                if isinstance(d, tuple)
                else f"transformer_blocks.{i}.{d}"
            )
    for i in range(count_blocks(keys, "single_transformer_blocks.")):
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


def is_flux2_bfl(keys) -> bool:
    return (
        "double_stream_modulation_img.lin.weight" in keys
        or "img_in.weight" in keys
        and ("single_stream_modulation.lin.weight" in keys)
    )


def is_flux2_diffusers(keys) -> bool:
    return "x_embedder.weight" in keys and "double_stream_modulation_img.linear.weight" in keys
