"""Recognising LoRAs made for other models, by their keys and shapes, so the error says what the file is.

FLUX.1 must be told apart by its keys: FLUX.1 has per-block modulation (``img_mod`` / ``txt_mod`` in
double blocks, ``modulation.lin`` in single blocks) where FLUX.2 shares one modulation per stream, and
its hidden size (3072) equals [klein] 4B's, so FLUX.1 attention LoRAs fit 4B's shapes. Its MLP shapes
differ (FLUX.1: plain GELU MLP of 4H; FLUX.2: SwiGLU of 2 x 3H), which catches the rest.
"""

from __future__ import annotations

import re

# (pattern searched in every key, what the file is, how to fix). First hit wins.
KEY_RULES: tuple[tuple[re.Pattern[str], str, str], ...] = (
    (
        re.compile(
            r"double_blocks[._]\d+[._](img|txt)_mod[._]lin"
            r"|(^|[._])single_blocks[._]\d+[._]modulation[._]lin"
            r"|(^|[._])vector_in[._]"
            r"|single_transformer_blocks[._]\d+[._](proj_mlp|proj_out|norm[._]linear)[._]"
            r"|transformer_blocks[._]\d+[._]norm1(_context)?[._]linear"
            r"|time_text_embed[._]",
            re.IGNORECASE,
        ),
        "a FLUX.1 LoRA (its keys name FLUX.1's per-block modulation layers)",
        "FLUX.1 LoRAs do not work on FLUX.2; pick a LoRA trained for FLUX.2, or use this one with a FLUX.1 "
        "model and ComfyUI's LoraLoaderModelOnly.",
    ),
    (
        re.compile(
            r"^lora_unet_(down|up|mid|input|output|middle)_block"
            r"|(^|[._])(down_blocks|up_blocks|input_blocks|output_blocks)[._]\d"
            r"|(^|[._])(mid_block|middle_block)[._]"
            r"|^lora_te[12]_",
            re.IGNORECASE,
        ),
        "an SD 1.x / SDXL LoRA (UNet keys)",
        "use it with an SD/SDXL checkpoint and ComfyUI's LoraLoader; Flux2Local takes FLUX.2 LoRAs only.",
    ),
)

# FLUX.1 factor shapes: (layer kind, dimension ratio that only FLUX.1 has).
# linear1: out = 3H + 4H (FLUX.2: 3H + 2 x 3H); img/txt MLP in: 4H (FLUX.2: 2 x 3H); linear2 in: H + 4H.
FLUX1_SHAPES: dict[str, tuple[str, int]] = {
    "linear1": ("out/in", 7),
    "img_mlp.0": ("out/in", 4),
    "txt_mlp.0": ("out/in", 4),
    "linear2": ("in/out", 5),
    "img_mlp.2": ("in/out", 4),
    "txt_mlp.2": ("in/out", 4),
}

FLUX1_SHAPE_PROBLEM = (
    "a FLUX.1 LoRA: its '{kind}' factors are {out} x {inp}, FLUX.1's MLP shape (FLUX.2 uses a wider "
    "SwiGLU MLP)"
)


def describe_foreign(keys) -> tuple[str, str] | None:
    """(what the file is, fix) when the keys belong to a LoRA for another model family, else None."""
    for pattern, what, fix in KEY_RULES:
        for k in keys:
            if pattern.search(k):
                return f"{what}, e.g. '{k}'", fix
    return None


def flux1_shape(kind: str, out_features: int, in_features: int) -> bool:
    """True when a layer of this kind has FLUX.1's shape ratio, which no FLUX.2 size has."""
    rule = FLUX1_SHAPES.get(kind)
    if rule is None or not out_features or not in_features:
        return False
    which, ratio = rule
    a, b = (out_features, in_features) if which == "out/in" else (in_features, out_features)
    return a == ratio * b
