"""LoRA key names of every common FLUX.2 format, mapped onto the transformer's BFL module names.

A LoRA key is ``<prefix><module><suffix>``:

    prefix   naming of <module>        example
    diffusion_model.     dotted BFL or diffusers   diffusion_model.double_blocks.0.img_attn.qkv.lora_A.weight
    transformer.         dotted diffusers (PEFT)    transformer.transformer_blocks.0.attn.to_q.lora_A.weight
    base_model.model.    dotted diffusers / BFL     base_model.model.single_transformer_blocks.0.attn.to_out...
    lora_unet_           underscored (kohya)        lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight
    lora_transformer_    underscored (OneTrainer)   lora_transformer_transformer_blocks_0_attn_to_q.lora_up...
    lycoris_             underscored (LyCORIS)      lycoris_transformer_blocks_0_attn_to_q.lokr_w1
    (none)               dotted (DiffSynth, bare)   transformer_blocks.0.attn.to_q.lora_A.weight

The diffusers names come from the checkpoint loader's own key map (``checkpoint.layouts``), so LoRAs and
diffusers checkpoints always agree: diffusers ``to_q`` / ``to_k`` / ``to_v`` (``add_*`` for the text
stream) are the row thirds of BFL's fused ``qkv``, and ``norm_out.linear`` is
``final_layer.adaLN_modulation.1`` with its two row halves swapped ((scale, shift) vs (shift, scale)).
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

import torch

from ..checkpoint.layouts import SWAPPED, bfl_to_diffusers, diffusers_key_map
from ..config import Flux2Config, bfl_shapes


@dataclass(frozen=True)
class Slot:
    """Where a LoRA module's output rows land in the BFL layer.

    Attributes:
        part: index of the equal row block (0 for a whole layer; 0/1/2 for q/k/v of a fused qkv).
        parts: number of equal row blocks the layer's rows split into (1 = the whole layer).
        swap: the module's two row halves are the layer's halves swapped.
        start: first layer row of an update on an arbitrary row range (e.g. the MLP rows of a
            single block's fused linear1); None = rows part x n .. (part + 1) x n.
    """

    part: int = 0
    parts: int = 1
    swap: bool = False
    start: int | None = None


WHOLE = Slot()

# Parameter suffixes -> role. Longest first, so ".lora_A.default.weight" wins over shorter ones.
SUFFIXES: tuple[tuple[str, str], ...] = tuple(
    sorted(
        {
            ".lora_A.weight": "down",
            ".lora_B.weight": "up",
            ".lora_A.default.weight": "down",
            ".lora_B.default.weight": "up",
            ".lora_down.weight": "down",
            ".lora_up.weight": "up",
            ".lora.down.weight": "down",
            ".lora.up.weight": "up",
            ".alpha": "alpha",
            ".dora_scale": "dora",
            ".lora_magnitude_vector": "dora",
            ".lora_magnitude_vector.weight": "dora",
            ".lokr_w1": "lokr_w1",
            ".lokr_w1_a": "lokr_w1_a",
            ".lokr_w1_b": "lokr_w1_b",
            ".lokr_w2": "lokr_w2",
            ".lokr_w2_a": "lokr_w2_a",
            ".lokr_w2_b": "lokr_w2_b",
            ".lokr_t2": "tucker",
            ".hada_w1_a": "hada_w1_a",
            ".hada_w1_b": "hada_w1_b",
            ".hada_w2_a": "hada_w2_a",
            ".hada_w2_b": "hada_w2_b",
            ".hada_t1": "tucker",
            ".hada_t2": "tucker",
            ".lora_mid.weight": "tucker",
            ".diff": "diff",
            ".diff_b": "bias",
            ".lora_B.bias": "bias",
            ".lora_up.bias": "bias",
        }.items(),
        key=lambda kv: -len(kv[0]),
    )
)

# Roles this loader does not apply, and why (shown in the "not loaded" warning).
UNSUPPORTED_ROLES = {
    "tucker": "Tucker / mid factors are for convolutions (FLUX.2 has none)",
    "diff": "full-weight differences are not LoRA factors",
    "bias": "FLUX.2 linears have no bias",
}

# Key prefixes -> (naming, format label). Dotted prefixes are stripped and the rest read as a dotted
# module path (BFL or diffusers); underscored prefixes are followed by a module path with '.' -> '_'.
DOTTED_PREFIXES: tuple[tuple[str, str], ...] = (
    ("model.diffusion_model.", "ai-toolkit / BFL"),
    ("diffusion_model.", "ai-toolkit / BFL"),
    ("base_model.model.", "diffusers / PEFT"),
    ("transformer.", "diffusers / PEFT"),
)
UNDERSCORED_PREFIXES: tuple[tuple[str, str], ...] = (
    ("lora_unet_", "kohya / musubi"),
    ("lora_transformer_", "OneTrainer"),
    ("lycoris_", "LyCORIS"),
)
BARE_LABEL = "bare module names (DiffSynth)"

_BLOCK = re.compile(
    r"^(double_blocks|single_blocks|transformer_blocks|single_transformer_blocks)\.(\d+)\.(.+)$"
)
_BLOCK_US = re.compile(
    r"^(double_blocks|single_blocks|transformer_blocks|single_transformer_blocks)_(\d+)_(.+)$"
)
_DIFFUSERS_CONTAINER = {"transformer_blocks": "double_blocks", "single_transformer_blocks": "single_blocks"}


def _template(name: str) -> tuple[str | None, str]:
    """(block container or None, rest) of a dotted module name of block 0 / a top-level module."""
    m = _BLOCK.match(name)
    return (m.group(1), m.group(3)) if m else (None, name)


@functools.cache
def _tables() -> tuple[dict, dict]:
    """Dotted and underscored module templates -> (BFL container or None, BFL rest, Slot).

    Keys are (container or None, rest); underscored keys are lower-cased with '.' -> '_'. Built once from
    the BFL key list of a one-block [dev] config (every layer kind, guidance embedder included) and the
    checkpoint loader's diffusers map of those keys.
    """
    shapes = bfl_shapes(Flux2Config.from_name("dev").replace(depth=1, depth_single=1))
    linears = [k for k, s in shapes.items() if k.endswith(".weight") and len(s) == 2]
    dotted: dict[tuple[str | None, str], tuple[str | None, str, Slot]] = {}
    for key in linears:
        container, rest = _template(key[: -len(".weight")])
        dotted[(container, rest)] = (container, rest, WHOLE)
    # Only the names of the converted dict matter: the loader's own map turns them back into sources.
    names = bfl_to_diffusers({k: torch.empty(6, 1) for k in shapes})
    for bfl_key, source in diffusers_key_map(names).items():
        if bfl_key not in linears:
            continue
        container, rest = _template(bfl_key[: -len(".weight")])
        sources = source if isinstance(source, tuple) else (source,)
        for i, src in enumerate(sources):
            d_container, d_rest = _template(src[: -len(".weight")])
            slot = Slot(i, len(sources), swap=bfl_key in SWAPPED)
            dotted[(d_container, d_rest)] = (container, rest, slot)
    underscored = {
        (c, rest.replace(".", "_").lower()): target for (c, rest), target in dotted.items() if c is not None
    }
    underscored.update({(None, r.replace(".", "_").lower()): t for (c, r), t in dotted.items() if c is None})
    return dotted, underscored


@dataclass(frozen=True)
class Target:
    """One LoRA module resolved onto the transformer: BFL module path and where its rows land."""

    module: str
    slot: Slot


def _resolve(container: str | None, index: str | None, rest: str, table: dict) -> Target | None:
    hit = table.get((container, rest))
    if hit is None:
        return None
    bfl_container, bfl_rest, slot = hit
    module = bfl_rest if bfl_container is None else f"{bfl_container}.{int(index)}.{bfl_rest}"
    return Target(module, slot)


def resolve_dotted(name: str) -> Target | None:
    """A dotted module path (BFL or diffusers, no prefix) -> its BFL target, or None."""
    dotted, _ = _tables()
    m = _BLOCK.match(name)
    if m:
        return _resolve(m.group(1), m.group(2), m.group(3), dotted)
    return _resolve(None, None, name, dotted)


def resolve_underscored(name: str) -> Target | None:
    """An underscored module path (kohya / OneTrainer / LyCORIS, no prefix) -> its BFL target, or None."""
    _, underscored = _tables()
    low = name.lower()
    m = _BLOCK_US.match(low)
    if m:
        return _resolve(m.group(1), m.group(2), m.group(3), underscored)
    return _resolve(None, None, low, underscored)


def split_key(key: str) -> tuple[str, str] | None:
    """(module key, role) of a LoRA tensor name, or None for a suffix no format uses."""
    for suffix, role in SUFFIXES:
        if key.endswith(suffix) and len(key) > len(suffix):
            return key[: -len(suffix)], role
    return None


def resolve_module(module_key: str) -> tuple[Target | None, str]:
    """The BFL target of a LoRA module key (prefix included) and the format label of its naming."""
    for prefix, label in UNDERSCORED_PREFIXES:
        if module_key.startswith(prefix):
            return resolve_underscored(module_key[len(prefix) :]), label
    for prefix, label in DOTTED_PREFIXES:
        if module_key.startswith(prefix):
            return resolve_dotted(module_key[len(prefix) :]), label
    return resolve_dotted(module_key), BARE_LABEL


def is_block_module(module: str) -> bool:
    return module.startswith(("double_blocks.", "single_blocks."))


def block_kind_index(module: str) -> tuple[str, int] | None:
    """("double_blocks" | "single_blocks", index) of a BFL block module path, else None."""
    m = re.match(r"^(double_blocks|single_blocks)\.(\d+)\.", module)
    return (m.group(1), int(m.group(2))) if m else None


# BFL module (block-relative for blocks) -> which of its dimensions equals the model width H.
# Used to tell which FLUX.2 size a LoRA was trained for from its factor shapes alone.
WIDTH_DIM: dict[str, str] = {
    "img_attn.qkv": "in",
    "txt_attn.qkv": "in",
    "img_attn.proj": "in",
    "txt_attn.proj": "in",
    "img_mlp.0": "in",
    "txt_mlp.0": "in",
    "img_mlp.2": "out",
    "txt_mlp.2": "out",
    "linear1": "in",
    "linear2": "out",
    "img_in": "out",
    "txt_in": "out",
    "time_in.in_layer": "out",
    "time_in.out_layer": "in",
    "guidance_in.in_layer": "out",
    "guidance_in.out_layer": "in",
    "double_stream_modulation_img.lin": "in",
    "double_stream_modulation_txt.lin": "in",
    "single_stream_modulation.lin": "in",
    "final_layer.linear": "in",
    "final_layer.adaLN_modulation.1": "in",
}


def layer_kind(module: str) -> str:
    """The module path without its block prefix: "double_blocks.3.img_attn.qkv" -> "img_attn.qkv"."""
    _, rest = _template(module)
    return rest
