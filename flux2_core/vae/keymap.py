"""Key maps and layout detection for FLUX.2 VAE checkpoints.

Layouts:
- ``bfl``: ``ae.safetensors`` from the BFL repos; keys equal our module names.
- ``comfyui``: ComfyUI's ``flux2-vae.safetensors`` / VAESave output: BFL names, may carry the
  ``bn.num_batches_tracked`` buffer of ComfyUI's BatchNorm2d and, inside a full checkpoint, the
  ``first_stage_model.`` prefix (``vae.`` is also stripped).
- ``diffusers``: ``vae/diffusion_pytorch_model.safetensors`` of ``AutoencoderKLFlux2``.
"""

from __future__ import annotations

import re

# Prefixes ComfyUI (or merged checkpoints) put in front of VAE keys.
COMFY_PREFIXES = ("first_stage_model.", "vae.")

# Keys present in files but not needed by the model (BatchNorm bookkeeping).
IGNORED_SUFFIXES = ("num_batches_tracked",)

# BFL name -> diffusers name for everything except the decoder levels (which need index arithmetic).
# Applied in order; ``{}`` groups are carried over.
_RULES: list[tuple[str, str]] = [
    (r"^encoder\.quant_conv\.(.*)$", r"quant_conv.\1"),
    (r"^decoder\.post_quant_conv\.(.*)$", r"post_quant_conv.\1"),
    (r"^(encoder|decoder)\.norm_out\.(.*)$", r"\1.conv_norm_out.\2"),
    (r"^encoder\.down\.(\d+)\.block\.(\d+)\.(.*)$", r"encoder.down_blocks.\1.resnets.\2.\3"),
    (r"^encoder\.down\.(\d+)\.downsample\.conv\.(.*)$", r"encoder.down_blocks.\1.downsamplers.0.conv.\2"),
    (r"^(encoder|decoder)\.mid\.block_1\.(.*)$", r"\1.mid_block.resnets.0.\2"),
    (r"^(encoder|decoder)\.mid\.block_2\.(.*)$", r"\1.mid_block.resnets.1.\2"),
    (r"^(encoder|decoder)\.mid\.attn_1\.norm\.(.*)$", r"\1.mid_block.attentions.0.group_norm.\2"),
    (r"^(encoder|decoder)\.mid\.attn_1\.(q|k|v)\.(.*)$", r"\1.mid_block.attentions.0.to_\2.\3"),
    (r"^(encoder|decoder)\.mid\.attn_1\.proj_out\.(.*)$", r"\1.mid_block.attentions.0.to_out.0.\2"),
]
_DECODER_LEVEL = re.compile(r"^decoder\.up\.(\d+)\.(block\.(\d+)|upsample)\.(.*)$")


def bfl_to_diffusers_key(key: str, num_levels: int) -> str:
    """Name of a BFL VAE key in the diffusers layout.

    Args:
        key: a BFL key, e.g. ``decoder.up.0.block.2.conv1.weight``.
        num_levels: number of resolution levels (4 for FLUX.2); diffusers numbers decoder levels
            deepest first, so ``up.j`` becomes ``up_blocks.(num_levels - 1 - j)``.
    """
    m = _DECODER_LEVEL.match(key)
    if m:
        level = num_levels - 1 - int(m.group(1))
        inner = f"resnets.{m.group(3)}" if m.group(3) is not None else "upsamplers.0"
        out = f"decoder.up_blocks.{level}.{inner}.{m.group(4)}"
    else:
        out = key
        for pattern, repl in _RULES:
            new, n = re.subn(pattern, repl, out)
            if n:
                out = new
                break
    # ResNet 1x1 shortcut naming differs in every level.
    return out.replace(".nin_shortcut.", ".conv_shortcut.")


def is_attention_projection(key: str) -> bool:
    """BFL 1x1-conv attention weights (C, C, 1, 1) that diffusers stores as Linear (C, C)."""
    return re.search(r"\.mid\.attn_1\.(q|k|v|proj_out)\.weight$", key) is not None


def strip_prefix(keys: list[str]) -> tuple[str, list[str]]:
    """Find a ComfyUI prefix shared by the VAE keys; returns (prefix or "", keys without it)."""
    for prefix in COMFY_PREFIXES:
        inner = [k[len(prefix) :] for k in keys if k.startswith(prefix)]
        if any(k.startswith(("encoder.", "decoder.")) for k in inner):
            return prefix, inner
    return "", list(keys)
