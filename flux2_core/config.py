"""FLUX.2 transformer configuration: named presets and inference from checkpoint keys and shapes.

Architecture (hidden size, depth, context width, guidance embedder) is always read from the weights.
Weights cannot tell distilled from base, nor 9B from 9B-KV, so only those two facts come from a hint
(the file name, or ``is_distilled`` in a diffusers ``model_index.json``).
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass

from .checkpoint.keys import count_blocks

HEAD_DIM = 128


@dataclass(frozen=True)
class Flux2Config:
    """Shape of a FLUX.2 transformer (MMDiT with shared modulation).

    Attributes:
        variant: preset name ("dev", "klein-4b", "klein-9b", "klein-base-4b", "klein-base-9b",
            "klein-9b-kv") or "custom" for shapes matching no preset (e.g. tiny test models).
        hidden_size: model width H (heads x 128).
        num_heads: attention heads (head dim is 128).
        depth: double-stream blocks.
        depth_single: single-stream blocks.
        context_dim: text feature width (3 stacked encoder layers).
        in_channels: packed latent channels (128).
        mlp_ratio: MLP hidden = mlp_ratio x H (SwiGLU, so the first linear has 2x that).
        guidance_embed: has ``guidance_in`` (guidance-distilled [dev]).
        distilled: step-distilled (klein) or guidance-distilled (dev): no CFG by default.
        kv_refs: reference tokens use the KV-cached path (klein 9B-KV).
        axes_dim: RoPE dims per position axis (t, h, w, l); sums to the head dim.
        theta: RoPE base.
    """

    variant: str = "dev"
    hidden_size: int = 6144
    num_heads: int = 48
    depth: int = 8
    depth_single: int = 48
    context_dim: int = 15360
    in_channels: int = 128
    mlp_ratio: float = 3.0
    guidance_embed: bool = True
    distilled: bool = True
    kv_refs: bool = False
    axes_dim: tuple[int, ...] = (32, 32, 32, 32)
    theta: float = 2000.0

    def __post_init__(self) -> None:
        if self.hidden_size != self.num_heads * self.head_dim:
            raise ValueError(f"hidden_size {self.hidden_size} != num_heads {self.num_heads} x {HEAD_DIM}")
        if sum(self.axes_dim) != self.head_dim or any(a % 2 for a in self.axes_dim):
            raise ValueError(f"RoPE axes_dim {self.axes_dim} must be even and sum to the head dim {HEAD_DIM}")
        if self.depth < 0 or self.depth_single < 0:
            raise ValueError("block counts must be >= 0")

    @property
    def head_dim(self) -> int:
        return HEAD_DIM

    @property
    def mlp_hidden(self) -> int:
        return int(self.hidden_size * self.mlp_ratio)

    @classmethod
    def from_name(cls, name: str) -> Flux2Config:
        """The named preset (frozen; derive variants with ``.replace``). See ``PRESETS``."""
        try:
            return PRESETS[name]
        except KeyError:
            raise ValueError(f"unknown FLUX.2 variant '{name}'; known: {', '.join(PRESETS)}") from None

    def replace(self, **changes) -> Flux2Config:
        return dataclasses.replace(self, **changes)


_DEV = Flux2Config()
_K4 = Flux2Config("klein-4b", 3072, 24, 5, 20, 7680, guidance_embed=False)
_K9 = Flux2Config("klein-9b", 4096, 32, 8, 24, 12288, guidance_embed=False)

PRESETS: dict[str, Flux2Config] = {
    "dev": _DEV,
    "klein-4b": _K4,
    "klein-9b": _K9,
    "klein-base-4b": _K4.replace(variant="klein-base-4b", distilled=False),
    "klein-base-9b": _K9.replace(variant="klein-base-9b", distilled=False),
    "klein-9b-kv": _K9.replace(variant="klein-9b-kv", kv_refs=True),
}

# Architecture signature (H, context, depth, single, guidance) -> size family.
_FAMILIES = {
    (6144, 15360, 8, 48, True): "dev",
    (3072, 7680, 5, 20, False): "4b",
    (4096, 12288, 8, 24, False): "9b",
}


def config_from_bfl_shapes(
    shapes: dict[str, tuple[int, ...]],
    name_hint: str | None = None,
    is_distilled: bool | None = None,
) -> Flux2Config:
    """Infer the config from BFL-named keys and their (logical, dequantized) shapes.

    Args:
        shapes: BFL key -> shape, without any ``model.diffusion_model.`` prefix.
        name_hint: a file or folder name; only used for distilled-vs-base and the KV variant.
        is_distilled: from a diffusers ``model_index.json``; overrides the name for distillation.

    Raises:
        KeyError: a key needed for inference is absent (the caller turns this into a CheckpointError).
    """
    hidden, in_ch = shapes["img_in.weight"]
    ctx = shapes["txt_in.weight"][1]
    depth = count_blocks(shapes, "double_blocks.")
    single = count_blocks(shapes, "single_blocks.")
    guidance = "guidance_in.in_layer.weight" in shapes
    mlp_ratio = 3.0
    if depth:
        mlp_ratio = shapes["double_blocks.0.img_mlp.2.weight"][1] / hidden
    elif single:
        mlp_ratio = (shapes["single_blocks.0.linear2.weight"][1] - hidden) / hidden
    hint = (name_hint or "").lower()
    kv = bool(re.search(r"(^|[-_ .])kv([-_ .]|$)", hint))
    distilled = not re.search(r"(^|[-_ .])base([-_ .]|$)", hint) if is_distilled is None else is_distilled
    family = _FAMILIES.get((hidden, ctx, depth, single, guidance))
    if family == "dev":
        variant = "dev"
    elif family is not None:
        variant = f"klein-{'' if distilled else 'base-'}{family}" + ("-kv" if kv and family == "9b" else "")
    else:
        variant = "custom"
    if variant in PRESETS:
        return PRESETS[variant]
    return Flux2Config(
        variant=variant,
        hidden_size=hidden,
        num_heads=hidden // HEAD_DIM,
        depth=depth,
        depth_single=single,
        context_dim=ctx,
        in_channels=in_ch,
        mlp_ratio=mlp_ratio,
        guidance_embed=guidance,
        distilled=distilled,
        kv_refs=kv,
    )


def bfl_shapes(config: Flux2Config) -> dict[str, tuple[int, ...]]:
    """Every BFL checkpoint key of ``config`` with its shape (the full key set of a real file)."""
    H, D, M, ctx = config.hidden_size, config.head_dim, config.mlp_hidden, config.context_dim
    out: dict[str, tuple[int, ...]] = {
        "img_in.weight": (H, config.in_channels),
        "txt_in.weight": (H, ctx),
        "time_in.in_layer.weight": (H, 256),
        "time_in.out_layer.weight": (H, H),
        "double_stream_modulation_img.lin.weight": (6 * H, H),
        "double_stream_modulation_txt.lin.weight": (6 * H, H),
        "single_stream_modulation.lin.weight": (3 * H, H),
        "final_layer.adaLN_modulation.1.weight": (2 * H, H),
        "final_layer.linear.weight": (config.in_channels, H),
    }
    if config.guidance_embed:
        out["guidance_in.in_layer.weight"] = (H, 256)
        out["guidance_in.out_layer.weight"] = (H, H)
    for i in range(config.depth):
        for s in ("img", "txt"):
            p = f"double_blocks.{i}.{s}_"
            out[p + "attn.qkv.weight"] = (3 * H, H)
            out[p + "attn.norm.query_norm.scale"] = (D,)
            out[p + "attn.norm.key_norm.scale"] = (D,)
            out[p + "attn.proj.weight"] = (H, H)
            out[p + "mlp.0.weight"] = (2 * M, H)
            out[p + "mlp.2.weight"] = (H, M)
    for i in range(config.depth_single):
        p = f"single_blocks.{i}."
        out[p + "linear1.weight"] = (3 * H + 2 * M, H)
        out[p + "linear2.weight"] = (H, H + M)
        out[p + "norm.query_norm.scale"] = (D,)
        out[p + "norm.key_norm.scale"] = (D,)
    return out


def is_block_linear(key: str) -> bool:
    """True for the double/single-block Linear weights (the ones FP8/NVFP4 files quantize)."""
    return (
        key.startswith(("double_blocks.", "single_blocks."))
        and key.endswith(".weight")
        and (".qkv." in key or ".proj." in key or "_mlp." in key or ".linear1." in key or ".linear2." in key)
    )
