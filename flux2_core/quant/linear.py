"""Linear layers whose weight stays in its stored bytes (FP8, NVFP4, GGUF), one family for all formats.

A ``QuantLinear`` holds exactly the tensors its format stores (``formats.py``) as parameters
(``requires_grad=False``), so ``.to(device)``, state dicts and the weight streamer all move and
count the stored bytes. ``forward`` uses the format's native matmul where the GPU has one, else
dequantizes the weight into a shared scratch buffer (float32 math, rounded once to the
activation dtype) right before ``F.linear``. Nothing in ``forward`` reads values back to the host
or branches on them, so ``torch.compile`` can fuse the dequantization with its neighbours.

Public contract: ``in_features``, ``out_features``, ``forward(x (..., in)) -> (..., out)`` in the
activation dtype, ``dequantized(dtype) -> (out, in)``; ``storage`` names the format ("Q4_K").
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .formats import QuantFormat, fp8_format, gguf_format, nvfp4_format
from .ggml import GGMLType, ggml_type
from .scratch import scratch


class QuantLinear(nn.Module):
    """A Linear keeping its weight in a quantized storage format.

    Args:
        in_features, out_features: as ``nn.Linear``.
        fmt: the storage format (``formats.QuantFormat``).
        bias: add a ``bias`` parameter (out,) in ``bias_dtype``.
        bias_dtype: dtype of the bias.
        device: where the (empty) tensors are created; ``"meta"`` before assign-loading.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        fmt: QuantFormat,
        bias: bool = False,
        bias_dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.fmt = fmt
        for name, (shape, dtype) in fmt.layout(out_features, in_features).items():
            self.register_parameter(
                name, nn.Parameter(torch.empty(shape, dtype=dtype, device=device), requires_grad=False)
            )
        self.bias = (
            nn.Parameter(torch.empty(out_features, dtype=bias_dtype, device=device), requires_grad=False)
            if bias
            else None
        )

    @property
    def storage(self) -> str:
        """Name of the storage format ("FP8_E4M3", "NVFP4", "Q4_K", ...)."""
        return self.fmt.name

    def dequantized(self, dtype: torch.dtype) -> torch.Tensor:
        """A new (out, in) tensor of the weight in ``dtype`` (fp32 math, rounded once)."""
        return self.fmt.dequantize(self, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.fmt.matmul(self, x)
        if y is None:
            w = self.fmt.dequantize(
                self, x.dtype, out=scratch((self.out_features, self.in_features), x.dtype, x.device)
            )
            return F.linear(x, w, None if self.bias is None else self.bias.to(x.dtype))
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def stored_bytes(self) -> int:
        """Bytes of the stored tensors (weight, scales, bias)."""
        return sum(p.numel() * p.element_size() for p in self.parameters())

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, storage={self.storage}"


class FP8Linear(QuantLinear):
    """float8 weight with a per-tensor (``()``) or per-row (``(out, 1)``) fp32 ``weight_scale``.

    State-dict names match BFL / ComfyUI fp8 files (``weight``, ``weight_scale``, ``input_scale``).
    ``torch._scaled_mm`` runs where the GPU has FP8 tensor cores (SM >= 8.9) and the file gives a
    static ``input_scale``; elsewhere (RTX 30xx, CPU) the weight is dequantized per layer.

    Args:
        in_features, out_features: as ``nn.Linear``.
        has_input_scale: keep an ``input_scale`` parameter (activation scale of FP8 matmuls).
        weight_dtype: ``torch.float8_e4m3fn`` or ``torch.float8_e5m2``.
        per_row: one scale per output row.
        device: where the (empty) tensors are created.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        has_input_scale: bool = True,
        weight_dtype: torch.dtype = torch.float8_e4m3fn,
        device: torch.device | str | None = None,
        per_row: bool = False,
        bias: bool = False,
    ):
        super().__init__(
            in_features,
            out_features,
            fp8_format(weight_dtype, per_row=per_row, input_scale=has_input_scale),
            bias=bias,
            device=device,
        )
        if not has_input_scale:
            self.input_scale = None


class NVFP4Linear(QuantLinear):
    """NVFP4 weight kept packed (``weight`` uint8, ``weight_scale`` e4m3 blocks, ``weight_scale_2``).

    FP4 matmuls run through comfy-kitchen on SM >= 10 when it is installed (not exercised by this
    project's tests); everywhere else the weight is dequantized per layer.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        has_input_scale: bool = False,
        device: torch.device | str | None = None,
        bias: bool = False,
    ):
        super().__init__(in_features, out_features, nvfp4_format(has_input_scale), bias=bias, device=device)
        if not has_input_scale:
            self.input_scale = None


class GGUFLinear(QuantLinear):
    """A GGML block-quantized weight (``weight`` uint8 (out, row bytes)), dequantized per layer."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        qtype: GGMLType | str | int,
        device: torch.device | str | None = None,
        bias: bool = False,
    ):
        qtype = qtype if isinstance(qtype, GGMLType) else ggml_type(qtype)
        if in_features % qtype.block:
            raise ValueError(
                f"{qtype.name} needs rows that are a multiple of {qtype.block}, got {in_features}"
            )
        super().__init__(in_features, out_features, gguf_format(qtype), bias=bias, device=device)

    @property
    def qtype(self) -> GGMLType:
        return self.fmt.qtype
