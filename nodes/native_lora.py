"""ComfyUI's LoRA patches on a Flux2Local MODEL -> one in-memory ``Flux2LoRA``, applied on the fly.

ComfyUI's LoRA loaders (LoraLoaderModelOnly, LoraLoader, stacks of them) add patches to a ModelPatcher:
``patches[key] = [(strength, adapter, strength_model, offset, function), ...]`` with ``key`` like
``diffusion_model.double_blocks.0.img_attn.qkv.weight``, ``adapter`` a ``comfy.weight_adapter`` object
(LoRA, LoHa, LoKr) whose ``weights`` tuple holds the factors, ``offset`` (dim 0, first row, rows) for
diffusers q/k/v slices of a fused layer, and ``function`` ComfyUI's ``swap_scale_shift`` for diffusers'
norm_out. ComfyUI would add strength x scale x delta W into the weights (comfy/lora.py
calculate_weight and the adapters' calculate_weight); here the same factors and coefficients become
hooks beside the layers (``flux2_core.lora``), so streamed, FP8 and GGUF weights are never rebuilt.

Scales, as ComfyUI's adapters compute them: LoRA alpha / rank (rows of down), LoHa alpha / rows of
w1_b, LoKr alpha / rank of the decomposed factor (w2_b's rows, else w1_b's), 1 without alpha.
"""

from __future__ import annotations

import torch
from torch import nn

from ..flux2_core.errors import InputError
from ..flux2_core.lora import Kron, LowRank, lora_from_updates, row_slot
from ..flux2_core.lora.factors import loha_as_low_rank, swap_rows

_PREFIX, _SUFFIX = "diffusion_model.", ".weight"
_LIST = 8


def _swap_function():
    import comfy.utils

    return getattr(comfy.utils, "swap_scale_shift", None)


def _alpha(alpha, rank: int | None) -> float:
    if alpha is None or rank is None:
        return 1.0
    return float(alpha) / rank


def _delta(adapter, start: int, rows: int, layer_rows: int, swap: bool, strength: float):
    """One adapter's update as a LowRank or Kron on layer rows [start, start + rows), or a reason."""
    kind = getattr(adapter, "name", type(adapter).__name__)
    w = getattr(adapter, "weights", None)
    slot = row_slot(start, rows, layer_rows, swap)
    if kind == "lora" and w is not None:
        up, down, alpha, mid, dora, reshape = w[:6]
        if mid is not None or reshape is not None:
            return "LoCon mid/reshape weights (convolution LoRAs)"
        if dora is not None:
            return "DoRA (it rescales each row of the merged weight)"
        up, down = up.flatten(1), down.flatten(1)
        scale = strength * _alpha(alpha, down.shape[0])
        return LowRank(down, swap_rows(up) if swap else up, scale, slot)
    if kind == "loha" and w is not None:
        w1a, w1b, alpha, w2a, w2b, t1, t2, dora = w[:8]
        if t1 is not None or t2 is not None or dora is not None:
            return "LoHa with Tucker factors or DoRA"
        up, down = loha_as_low_rank(w1a, w1b, w2a, w2b)
        scale = strength * _alpha(alpha, w1b.shape[0])
        return LowRank(down, swap_rows(up) if swap else up, scale, slot)
    if kind == "lokr" and w is not None:
        w1, w2, alpha, w1_a, w1_b, w2_a, w2_b, t2, dora = w[:9]
        if t2 is not None or dora is not None:
            return "LoKr with a Tucker factor or DoRA"
        dim = None
        if w1 is None:
            dim = w1_b.shape[0]
            w1 = w1_a.float() @ w1_b.float()
        if w2 is None:
            dim = w2_b.shape[0]
        scale = strength * _alpha(alpha, dim)
        return Kron(
            w1, w2, None if w2 is not None else w2_a, None if w2 is not None else w2_b, scale, slot, swap
        )
    if isinstance(adapter, tuple | list) and adapter and isinstance(adapter[0], str):
        return f"a '{adapter[0]}' patch (whole-weight changes)"
    if isinstance(adapter, tuple) and len(adapter) == 1:
        return "a full weight difference (model merging)"
    return f"a {kind} patch"


def lora_from_patches(patches: dict, transformer: nn.Module, name: str = "LoRA patches"):
    """The ModelPatcher's ``patches`` as one ``Flux2LoRA`` (strengths folded in), or None if empty.

    Args:
        patches: ``ModelPatcher.patches``.
        transformer: the transformer they patch (BFL module names).
        name: what messages call the result.

    Raises:
        InputError: a patch that cannot be applied beside the layer (the message lists them and what
            to do instead).
    """
    swap_fn = _swap_function()
    layers: dict[str, list] = {}
    problems: list[str] = []
    for key, entries in patches.items():
        module = (
            key[len(_PREFIX) : -len(_SUFFIX)] if key.startswith(_PREFIX) and key.endswith(_SUFFIX) else None
        )
        layer = None
        if module is not None:
            try:
                layer = transformer.get_submodule(module)
            except AttributeError:
                layer = None
        out_f, in_f = getattr(layer, "out_features", None), getattr(layer, "in_features", None)
        if out_f is None or in_f is None:
            problems.append(f"{key}: not a linear layer's weight")
            continue
        for strength, adapter, strength_model, offset, function in entries:
            if strength_model != 1.0:
                problems.append(f"{key}: scales the base weight (strength_model {strength_model})")
                continue
            if function is not None and function is not swap_fn:
                problems.append(f"{key}: a weight function ({getattr(function, '__name__', function)})")
                continue
            if strength == 0:
                continue
            if offset is not None and offset[0] != 0:
                problems.append(f"{key}: a slice along the input dimension")
                continue
            start, rows = (0, out_f) if offset is None else (int(offset[1]), int(offset[2]))
            delta = _delta(adapter, start, rows, out_f, function is not None, float(strength))
            if isinstance(delta, str):
                problems.append(f"{key}: {delta}")
                continue
            if delta.in_features != in_f or delta.out_features != rows:
                problems.append(
                    f"{key}: update {delta.out_features}x{delta.in_features}, rows {start}..{start + rows} of a "
                    f"{out_f}x{in_f} layer"
                )
                continue
            layers.setdefault(module, []).append(delta)
    if problems:
        listed = "; ".join(problems[:_LIST]) + (
            f"; and {len(problems) - _LIST} more" if len(problems) > _LIST else ""
        )
        raise InputError(
            f"{len(problems)} model patches cannot be applied to a Flux2Local model, which adds LoRA, LoHa and "
            f"LoKr updates beside its layers and never rebuilds weights: {listed}. Fix: use FLUX.2 LoRA Loader "
            "or a plain LoRA file, or load the model with ComfyUI's UNETLoader for these patches."
        )
    if not layers:
        return None
    return lora_from_updates(name, layers, fmt="ComfyUI LoRA patches")


def patches_bytes(lora) -> int:
    """Bytes the factors take on the device (bf16-sized), for the VRAM budget."""
    return 0 if lora is None else lora.nbytes(torch.bfloat16.itemsize)
