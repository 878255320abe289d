"""Tiny random FLUX.2 LoRAs written as real safetensors files in every common key format.

Each writer also returns what the file means, computed from the tensors exactly as saved: BFL module
path -> delta W (out, in) in fp32 at strength 1, alpha / rank already applied. Tests compare the
loader's result with W + strength x delta W.

Naming per format (``FORMATS``):
    ai-toolkit       diffusion_model.<bfl>.lora_A.weight / .lora_B.weight / .alpha
    kohya            lora_unet_<bfl with _>.lora_down.weight / .lora_up.weight / .alpha
    peft             transformer.<diffusers>.lora_A.weight / .lora_B.weight; lora_alpha, r and
                     rank/alpha patterns in the ``lora_adapter_metadata`` JSON (as diffusers saves)
    peft-base-model  base_model.model.<diffusers>.lora_A.weight / .lora_B.weight, no alpha (scale 1)
    onetrainer       lora_transformer_<diffusers with _>.lora_down.weight / .lora_up.weight / .alpha
    diffsynth        <diffusers>.lora_A.weight / .lora_B.weight (bare names, scale 1)
    lokr             lycoris_<diffusers with _>.lokr_w1[_a/_b] / .lokr_w2[_a/_b] / .alpha
    lokr-bfl         diffusion_model.<bfl>.lokr_* (fused qkv as one Kronecker product)
    loha             lycoris_<diffusers with _>.hada_w1_a / _w1_b / _w2_a / _w2_b / .alpha
diffusers names split a fused qkv into to_q / to_k / to_v (each its own factors) and store
``norm_out.linear`` with its row halves swapped relative to BFL's ``final_layer.adaLN_modulation.1``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..checkpoint.layouts import SWAPPED, bfl_to_diffusers, swap_halves
from ..config import Flux2Config, bfl_shapes

FORMATS = (
    "ai-toolkit",
    "kohya",
    "peft",
    "peft-base-model",
    "onetrainer",
    "diffsynth",
    "lokr",
    "lokr-bfl",
    "loha",
)
_DIFFUSERS_NAMED = {"peft", "peft-base-model", "onetrainer", "diffsynth", "lokr", "loha"}
_KRON_FACTOR = 4  # LoKr w1 is (4, 4): every tiny layer width is a multiple of 4


def lora_targets(config: Flux2Config, kinds: str = "all") -> list[str]:
    """BFL module paths of the linear layers of ``config``.

    Args:
        config: the transformer's shape.
        kinds: "all" (every linear), "blocks" (double/single block linears only).
    """
    names = [
        k[: -len(".weight")] for k, s in bfl_shapes(config).items() if k.endswith(".weight") and len(s) == 2
    ]
    if kinds == "blocks":
        names = [n for n in names if n.startswith(("double_blocks.", "single_blocks."))]
    return names


def _diffusers_names(bfl_module: str) -> list[str]:
    """The diffusers module(s) holding this BFL linear (three for a fused qkv), in row order."""
    return [k[: -len(".weight")] for k in bfl_to_diffusers({bfl_module + ".weight": torch.empty(6, 1)})]


class _Writer:
    def __init__(self, seed: int, dtype: torch.dtype, gain: float):
        self.g = torch.Generator().manual_seed(seed)
        self.dtype = dtype
        self.gain = gain
        self.tensors: dict[str, torch.Tensor] = {}

    def rand(self, name: str, shape: tuple[int, ...], std: float) -> torch.Tensor:
        """A random tensor saved under ``name``; returns its saved values in fp32."""
        t = (torch.randn(shape, generator=self.g) * std).to(self.dtype)
        self.tensors[name] = t
        return t.float()

    def alpha(self, name: str, value: float | None) -> None:
        if value is not None:
            self.tensors[name] = torch.tensor(value, dtype=self.dtype)

    def lora(self, stem: str, out_f: int, in_f: int, rank: int, names: tuple[str, str]) -> torch.Tensor:
        """down (rank, in) / up (out, rank) under stem + names; returns up @ down in fp32."""
        down = self.rand(stem + names[0], (rank, in_f), in_f**-0.5)
        up = self.rand(stem + names[1], (out_f, rank), self.gain * rank**-0.5)
        return up @ down


def _saved_alpha(alpha: float | None, dtype: torch.dtype) -> float | None:
    """The alpha value as the file stores it (tensors are rounded to the file dtype)."""
    return None if alpha is None else float(torch.tensor(alpha, dtype=dtype).float())


def write_tiny_lora(
    path: str | os.PathLike,
    config: Flux2Config,
    fmt: str = "ai-toolkit",
    rank: int = 4,
    alpha: float | None = 2.0,
    seed: int = 0,
    targets: list[str] | None = None,
    dtype: torch.dtype = torch.bfloat16,
    gain: float = 0.5,
    lokr_layouts: tuple[int, ...] = (0, 1, 2),
) -> tuple[Path, dict[str, torch.Tensor]]:
    """Write a random LoRA for ``config`` in format ``fmt``.

    Args:
        path: the ``.safetensors`` file to write.
        config: the transformer the LoRA is for (shapes).
        fmt: one of ``FORMATS``.
        rank: LoRA rank (LoHa: rank of each Hadamard factor; LoKr: rank of the decomposed factor).
        alpha: the alpha written (None: no alpha, scale 1). For "peft" it goes to the metadata.
        seed: factor seed.
        targets: BFL module paths (default ``lora_targets(config)``: every linear).
        dtype: dtype of the saved tensors (LoRAs are usually bf16).
        gain: size of the update relative to the layer's weight (roughly).
        lokr_layouts: LoKr factor layouts the modules cycle through (see ``_write_lokr``).

    Returns:
        (file, BFL module path -> delta W (out, in) fp32 at strength 1).
    """
    if fmt not in FORMATS:
        raise ValueError(f"fmt must be one of {FORMATS}")
    path = Path(path)
    shapes = bfl_shapes(config)
    targets = lora_targets(config) if targets is None else targets
    w = _Writer(seed, dtype, gain)
    a = _saved_alpha(alpha, dtype)
    deltas: dict[str, torch.Tensor] = {}
    metadata: dict[str, str] = {}
    peft_ranks: dict[str, int] = {}
    peft_alphas: dict[str, float] = {}
    for n, bfl in enumerate(targets):
        out_f, in_f = shapes[bfl + ".weight"]
        modules = _diffusers_names(bfl) if fmt in _DIFFUSERS_NAMED else [bfl]
        rows = out_f // len(modules)
        parts = []
        for j, module in enumerate(modules):
            us = module.replace(".", "_")
            if fmt == "ai-toolkit":
                d = w.lora(
                    f"diffusion_model.{module}", rows, in_f, rank, (".lora_A.weight", ".lora_B.weight")
                )
                w.alpha(f"diffusion_model.{module}.alpha", alpha)
                parts.append(d * (a / rank if a is not None else 1.0))
            elif fmt in ("kohya", "onetrainer"):
                stem = ("lora_unet_" if fmt == "kohya" else "lora_transformer_") + us
                d = w.lora(stem, rows, in_f, rank, (".lora_down.weight", ".lora_up.weight"))
                w.alpha(stem + ".alpha", alpha)
                parts.append(d * (a / rank if a is not None else 1.0))
            elif fmt == "peft":
                # Every third module gets its own rank and alpha through the metadata patterns.
                r = rank * 2 if (n + j) % 3 == 0 else rank
                d = w.lora(f"transformer.{module}", rows, in_f, r, (".lora_A.weight", ".lora_B.weight"))
                mod_alpha = a
                if r != rank:
                    peft_ranks[module] = r
                    if a is not None:
                        mod_alpha = peft_alphas[module] = a * 3
                parts.append(d * (mod_alpha / r if mod_alpha is not None else 1.0))
            elif fmt in ("peft-base-model", "diffsynth"):
                stem = ("base_model.model." if fmt == "peft-base-model" else "") + module
                parts.append(w.lora(stem, rows, in_f, rank, (".lora_A.weight", ".lora_B.weight")))
            elif fmt in ("lokr", "lokr-bfl"):
                stem = f"lycoris_{us}" if fmt == "lokr" else f"diffusion_model.{module}"
                parts.append(
                    _write_lokr(
                        w, stem, rows, in_f, rank, alpha, a, variant=lokr_layouts[(n + j) % len(lokr_layouts)]
                    )
                )
            else:  # loha
                stem = f"lycoris_{us}"
                std1, std2 = in_f**-0.5, (w.gain / rank) ** 0.5
                w1a = w.rand(stem + ".hada_w1_a", (rows, rank), std2)
                w1b = w.rand(stem + ".hada_w1_b", (rank, in_f), std1**0.5)
                w2a = w.rand(stem + ".hada_w2_a", (rows, rank), std2)
                w2b = w.rand(stem + ".hada_w2_b", (rank, in_f), std1**0.5)
                w.alpha(stem + ".alpha", alpha)
                parts.append((w1a @ w1b) * (w2a @ w2b) * (a / rank if a is not None else 1.0))
        delta = torch.cat(parts, dim=0)
        if fmt in _DIFFUSERS_NAMED and bfl + ".weight" in SWAPPED:
            delta = swap_halves(delta)  # the file holds diffusers' (scale, shift) row order
        deltas[bfl] = delta
    if fmt == "peft" and alpha is not None:
        config_json = {
            "r": rank,
            "lora_alpha": a,
            "rank_pattern": peft_ranks,
            "alpha_pattern": peft_alphas,
            "target_modules": sorted({m for b in targets for m in _diffusers_names(b)}),
        }
        # As diffusers' save_lora_weights writes it: every entry prefixed with the component name.
        metadata["lora_adapter_metadata"] = json.dumps(
            {f"transformer.{k}": v for k, v in config_json.items()}
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in w.tensors.items()}, str(path), metadata=metadata or None)
    return path, deltas


def _write_lokr(
    w: _Writer,
    stem: str,
    out_f: int,
    in_f: int,
    rank: int,
    alpha: float | None,
    a: float | None,
    variant: int,
) -> torch.Tensor:
    """One LoKr module; ``variant`` cycles through the three factor layouts and their alpha rules:
    0: full w1, decomposed w2 (scale alpha / w2 rank); 1: both full (scale 1, alpha ignored);
    2: decomposed w1, full w2 (scale alpha / w1 rank)."""
    f = _KRON_FACTOR
    c, d = out_f // f, in_f // f
    if variant == 2:
        w1 = w.rand(stem + ".lokr_w1_a", (f, 2), 0.5) @ w.rand(stem + ".lokr_w1_b", (2, f), 0.5)
        dim = 2
    else:
        w1, dim = w.rand(stem + ".lokr_w1", (f, f), 0.5), None
    if variant == 0:
        w2 = w.rand(stem + ".lokr_w2_a", (c, rank), w.gain * rank**-0.5) @ w.rand(
            stem + ".lokr_w2_b", (rank, d), in_f**-0.5
        )
        dim = rank
    else:
        w2 = w.rand(stem + ".lokr_w2", (c, d), w.gain * in_f**-0.5)
    w.alpha(stem + ".alpha", alpha)
    scale = a / dim if a is not None and dim is not None else 1.0
    return torch.kron(w1, w2) * scale
