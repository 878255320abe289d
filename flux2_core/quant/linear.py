"""A Linear keeping float8 weights: ``torch._scaled_mm`` where the GPU has FP8 tensor cores and a
static input scale exists, else dequantize on the fly to the activation dtype."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .fp8 import FP8_MAX


def _has_fp8_mm(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)


class FP8Linear(nn.Module):
    """Bias-free Linear with an fp8 ``weight`` (out, in) and fp32 ``weight_scale`` / ``input_scale``.

    State-dict names match BFL fp8 files (``.weight``, ``.weight_scale``, ``.input_scale``), so the
    module is assign-loaded like any other.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        has_input_scale: bool = True,
        weight_dtype: torch.dtype = torch.float8_e4m3fn,
        device=None,
    ):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(
            torch.empty((out_features, in_features), dtype=weight_dtype, device=device), requires_grad=False
        )
        self.register_buffer("weight_scale", torch.ones((), dtype=torch.float32, device=device))
        if has_input_scale:
            self.register_buffer("input_scale", torch.ones((), dtype=torch.float32, device=device))
        else:
            self.input_scale = None

    def dequantized(self, dtype: torch.dtype) -> torch.Tensor:
        return (self.weight.to(torch.float32) * self.weight_scale).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (
            self.input_scale is not None
            and self.weight.dtype == torch.float8_e4m3fn
            and _has_fp8_mm(x.device)
            and x.shape[-1] % 16 == 0
            and self.out_features % 16 == 0
        ):
            x2 = x.reshape(-1, x.shape[-1])
            xq = (x2 / self.input_scale.to(x.dtype)).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
            out = torch._scaled_mm(
                xq, self.weight.t(), scale_a=self.input_scale, scale_b=self.weight_scale, out_dtype=x.dtype
            )
            return out.reshape(*x.shape[:-1], self.out_features)
        return F.linear(x, self.weight.to(x.dtype) * self.weight_scale.to(x.dtype))

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, fp8_mm={self.input_scale is not None}"
