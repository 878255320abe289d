"""LoRAs built from factors already in memory (e.g. another program's LoRA patches), not from a file.

``lora_from_updates`` wraps {BFL module path: updates} into a ``Flux2LoRA`` that ``apply_loras``
applies like a loaded file: on the fly beside each layer, never merged into the weights unless asked.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from ..errors import InputError
from .factors import Delta, Kron, LowRank
from .keys import Slot
from .loader import Flux2LoRA


def row_slot(start: int, rows: int, layer_rows: int, swap: bool = False) -> Slot:
    """The slot of an update covering layer rows [start, start + rows).

    An equal block of the layer (q, k or v of a fused qkv) becomes (part, parts); any other range
    (the MLP rows of a single block's linear1) keeps its first row.

    Args:
        start: first row of the layer the update writes.
        rows: rows of the update.
        layer_rows: the layer's output width.
        swap: the update's two row halves are the layer's halves swapped.
    """
    if start == 0 and rows == layer_rows:
        return Slot(swap=swap)
    if rows > 0 and start % rows == 0 and layer_rows % rows == 0:
        return Slot(start // rows, layer_rows // rows, swap=swap)
    return Slot(swap=swap, start=start)


def _check(module: str, delta: object) -> None:
    if not isinstance(delta, LowRank | Kron):
        raise InputError(f"LoRA update for {module}: expected a LowRank or Kron, got {type(delta).__name__}.")
    parts = (
        (delta.down, delta.up) if isinstance(delta, LowRank) else (delta.w1, delta.w2, delta.w2_a, delta.w2_b)
    )
    for t in parts:
        if t is not None and (not isinstance(t, torch.Tensor) or t.ndim != 2):
            raise InputError(f"LoRA update for {module}: every factor must be a 2-D tensor.")
    if isinstance(delta, LowRank) and delta.up.shape[1] != delta.down.shape[0]:
        raise InputError(
            f"LoRA update for {module}: up {tuple(delta.up.shape)} and down {tuple(delta.down.shape)} "
            "have different ranks."
        )


def lora_from_updates(
    name: str,
    layers: Mapping[str, Sequence[Delta]],
    fmt: str = "in-memory factors",
    hidden_size: int | None = None,
) -> Flux2LoRA:
    """A ``Flux2LoRA`` from updates made in memory.

    Args:
        name: what messages call it (stands in for the file path).
        layers: BFL module path (e.g. "double_blocks.0.img_attn.qkv") -> its updates; each update's
            ``scale`` is the full coefficient at strength 1 (alpha / rank times any strength of the
            source).
        fmt: the format label shown in logs.
        hidden_size: the model width the factors were made for, if known (checked by
            ``check_lora_fits`` before the per-layer shapes).

    Returns:
        The LoRA; apply it with ``apply_loras(transformer, [(lora, 1.0)])``.

    Raises:
        InputError: no updates, or an update that is not a pair of matching 2-D factors.
    """
    out: dict[str, tuple[Delta, ...]] = {}
    for module, deltas in layers.items():
        deltas = tuple(deltas)
        for d in deltas:
            _check(module, d)
        if deltas:
            out[module] = deltas
    if not out:
        raise InputError(f"{name}: no LoRA updates to apply.")
    return Flux2LoRA(name, fmt, out, hidden_size)
