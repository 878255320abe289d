"""FP8-stored Linear weights, dequantized one layer at a time as the layer runs.

ComfyUI's fp8 text encoders keep every decoder Linear weight as float8 with one fp32 scale per
tensor: W ~= float(W8) * scale. Keeping the fp8 bytes resident (and streaming them) halves memory and
transfer size; the full-precision weight exists only while its layer computes.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

_FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)


class Fp8Linear(nn.Module):
    """A bias-free Linear whose weight is float8 with a scalar scale.

    Args:
        in_features, out_features: as ``nn.Linear``.
        fp8_dtype: ``torch.float8_e4m3fn`` or ``torch.float8_e5m2``.
        device: where the (empty) parameters are created; ``"meta"`` before loading.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        fp8_dtype: torch.dtype = torch.float8_e4m3fn,
        device: torch.device | str | None = None,
    ):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight = nn.Parameter(
            torch.empty(out_features, in_features, dtype=fp8_dtype, device=device), requires_grad=False
        )
        self.register_buffer("weight_scale", torch.ones((), dtype=torch.float32, device=device))

    def dequantized(self, dtype: torch.dtype) -> torch.Tensor:
        # fp32 multiply, then cast: the same rounding as dequantizing the whole file up front.
        return (self.weight.to(torch.float32) * self.weight_scale).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dequantized(x.dtype))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, dtype={self.weight.dtype}"


def swap_fp8_linears(module: nn.Module, stored_dtype: Callable[[str], torch.dtype | None]) -> list[str]:
    """Replace each bias-free ``nn.Linear`` under ``module`` whose stored weight is float8 (on meta).

    Args:
        module: the module to edit in place.
        stored_dtype: qualified Linear name (relative to ``module``) -> dtype of its weight in the
            file, or ``None`` when the file does not have it.

    Returns:
        The qualified names of the replaced Linears.
    """
    names = []
    for name, child in list(module.named_modules()):
        for attr, sub in list(child.named_children()):
            qual = f"{name}.{attr}" if name else attr
            if type(sub) is nn.Linear and sub.bias is None and stored_dtype(qual) in _FP8_DTYPES:
                setattr(
                    child,
                    attr,
                    Fp8Linear(sub.in_features, sub.out_features, stored_dtype(qual), device="meta"),
                )
                names.append(qual)
    return names
