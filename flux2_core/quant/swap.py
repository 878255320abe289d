"""Putting quantized layers in place of a model's ``nn.Linear`` modules (on the meta device, before loading)."""

from __future__ import annotations

from collections.abc import Mapping

from torch import nn

from .formats import FP8Format, GGUFFormat, NVFP4Format, QuantFormat
from .linear import FP8Linear, GGUFLinear, NVFP4Linear, QuantLinear


def quant_layer(fmt: QuantFormat, in_features: int, out_features: int, bias: bool = False, device="meta"):
    """The ``QuantLinear`` subclass for ``fmt`` (FP8Linear, NVFP4Linear, GGUFLinear), with empty tensors."""
    if isinstance(fmt, FP8Format):
        return FP8Linear(
            in_features,
            out_features,
            has_input_scale=fmt.input_scale,
            weight_dtype=fmt.weight_dtype,
            per_row=fmt.per_row,
            device=device,
            bias=bias,
        )
    if isinstance(fmt, NVFP4Format):
        return NVFP4Linear(in_features, out_features, fmt.input_scale, device=device, bias=bias)
    if isinstance(fmt, GGUFFormat):
        return GGUFLinear(in_features, out_features, fmt.qtype, device=device, bias=bias)
    return QuantLinear(in_features, out_features, fmt, bias=bias, device=device)


def swap_linears(model: nn.Module, formats: Mapping[str, QuantFormat]) -> list[str]:
    """Replace the ``nn.Linear`` named in ``formats`` (qualified module names) by quantized layers.

    Args:
        model: edited in place; the new layers are created on the meta device (assign-load them).
        formats: module name -> storage format.

    Returns:
        The replaced names, sorted.

    Raises:
        KeyError: a name is not a submodule; TypeError: it is not an ``nn.Linear``.
    """
    for name, fmt in formats.items():
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        old = getattr(parent, attr)
        if isinstance(old, QuantLinear):
            continue
        if not isinstance(old, nn.Linear):
            raise TypeError(f"{name} is a {type(old).__name__}, not an nn.Linear")
        setattr(parent, attr, quant_layer(fmt, old.in_features, old.out_features, bias=old.bias is not None))
    return sorted(formats)
