"""The storage formats a quantized Linear can keep its weight in: one table entry per format.

Each entry says how the weight is stored (the tensors a layer holds, with shapes and dtypes), how
to dequantize it on the tensor's own device with torch ops (float32 math, rounded once to the
output dtype), and whether a native low-precision matmul exists on a given device:

==============  =====================================================  ===============================
format          stored tensors of an (out, in) weight                  native matmul
==============  =====================================================  ===============================
FP8 per-tensor  ``weight`` fp8 (out, in), ``weight_scale`` ()           ``torch._scaled_mm`` on SM >= 8.9
FP8 per-row     ``weight`` fp8 (out, in), ``weight_scale`` (out, 1)     with a static ``input_scale``
NVFP4           ``weight`` uint8 (out, in/2) two e2m1 per byte,          comfy-kitchen ``scaled_mm_nvfp4``
                ``weight_scale`` fp8 e4m3 per 16 values (cuBLAS          on SM >= 10 (untested here)
                tiled layout), ``weight_scale_2`` () fp32
GGUF <type>     ``weight`` uint8 (out, in / block * type_size)         none: per-layer dequantization
==============  =====================================================  ===============================

Everything else computes ``F.linear(x, dequantized weight)``: the weight-only path that cards
without FP8/FP4 tensor cores (RTX 30xx) use, and the reference the native paths are checked against.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from .fp8 import FP8_MAX, dequantize_fp8
from .ggml import GGMLType, dequantize_ggml
from .nvfp4 import dequantize_nvfp4

logger = logging.getLogger(__name__)

Layout = dict[str, tuple[tuple[int, ...], torch.dtype]]


_CAPABILITY: dict[torch.device, tuple[int, int]] = {}
_KITCHEN: list = []


def _capability(device: torch.device) -> tuple[int, int]:
    """Compute capability of a CUDA device ((0, 0) elsewhere), looked up once per device.

    A plain dict (not functools.cache) so that torch.compile traces the lookup as a constant.
    """
    if device.type != "cuda":
        return (0, 0)
    if device not in _CAPABILITY:
        _CAPABILITY[device] = torch.cuda.get_device_capability(device)
    return _CAPABILITY[device]


def _comfy_kitchen():
    """comfy-kitchen (ComfyUI's kernel package) if installed, else None (imported once)."""
    if not _KITCHEN:
        try:
            import comfy_kitchen
        except ImportError:
            comfy_kitchen = None
        _KITCHEN.append(comfy_kitchen)
    return _KITCHEN[0]


def _ceil(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(frozen=True)
class QuantFormat:
    """Base entry: ``name`` (storage name in summaries), ``bits_per_weight`` (stored bits per value)."""

    name: str

    def layout(self, out_features: int, in_features: int) -> Layout:
        raise NotImplementedError

    def dequantize(self, layer, dtype: torch.dtype, out: torch.Tensor | None = None) -> torch.Tensor:
        raise NotImplementedError

    def matmul(self, layer, x: torch.Tensor) -> torch.Tensor | None:
        """A native low-precision matmul of ``x`` (..., in) with the layer, or None where there is none."""
        return None

    def bits_per_weight(self, in_features: int) -> float:
        raise NotImplementedError


@dataclass(frozen=True)
class FP8Format(QuantFormat):
    """float8 weights with one fp32 scale per tensor or per output row: W = float(W8) * scale.

    Attributes:
        weight_dtype: ``torch.float8_e4m3fn`` or ``torch.float8_e5m2``.
        per_row: scale of shape (out, 1) instead of ().
        input_scale: the file has a static activation scale (``input_scale``), which the FP8 matmul needs.
    """

    weight_dtype: torch.dtype = torch.float8_e4m3fn
    per_row: bool = False
    input_scale: bool = False

    def layout(self, out_features: int, in_features: int) -> Layout:
        out: Layout = {
            "weight": ((out_features, in_features), self.weight_dtype),
            "weight_scale": ((out_features, 1) if self.per_row else (), torch.float32),
        }
        if self.input_scale:
            out["input_scale"] = ((), torch.float32)
        return out

    def dequantize(self, layer, dtype, out=None):
        return dequantize_fp8(layer.weight, layer.weight_scale, dtype, out=out)

    def matmul(self, layer, x):
        # FP8 tensor cores: SM 8.9 (RTX 40xx, L40) and newer. Needs e4m3 weights, a static input
        # scale (quantizing activations to e4m3), and 16-aligned dimensions (cuBLASLt).
        if (
            not self.input_scale
            or layer.input_scale is None  # dropped on purpose: the weight-only path (RTX 30xx behaviour)
            or self.weight_dtype != torch.float8_e4m3fn
            or _capability(x.device) < (8, 9)
            or x.shape[-1] % 16
            or layer.out_features % 16
        ):
            return None
        x2 = x.reshape(-1, x.shape[-1])
        # Scaled in fp32, rounded once to e4m3 (a bf16 division would round twice).
        xq = (x2.float() / layer.input_scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
        if self.per_row:
            # Row scales multiply the output columns: the product runs with unit weight scale.
            y = torch._scaled_mm(
                xq,
                layer.weight.t(),
                scale_a=layer.input_scale,
                scale_b=_one(x.device),
                out_dtype=torch.float32,
            )
            y = (y * layer.weight_scale.reshape(1, -1)).to(x.dtype)
        else:
            y = torch._scaled_mm(
                xq, layer.weight.t(), scale_a=layer.input_scale, scale_b=layer.weight_scale, out_dtype=x.dtype
            )
        return y.reshape(*x.shape[:-1], layer.out_features)

    def bits_per_weight(self, in_features):
        return 8.0


_ONES: dict[torch.device, torch.Tensor] = {}


def _one(device: torch.device) -> torch.Tensor:
    if device not in _ONES:
        _ONES[device] = torch.ones((), dtype=torch.float32, device=device)
    return _ONES[device]


@dataclass(frozen=True)
class NVFP4Format(QuantFormat):
    """Packed e2m1 pairs, an e4m3 scale per 16 values and a global fp32 scale (about 4.5 bits a weight).

    Attributes:
        input_scale: the file has a static activation scale (used by the FP4 matmul).
    """

    input_scale: bool = False

    def layout(self, out_features: int, in_features: int) -> Layout:
        # Block scales in cuBLAS's tiled layout: rows padded to 128, scale columns to 4.
        scale_shape = (_ceil(out_features, 128) * 128, _ceil(in_features // 16, 4) * 4)
        out: Layout = {
            "weight": ((out_features, in_features // 2), torch.uint8),
            "weight_scale": (scale_shape, torch.float8_e4m3fn),
            "weight_scale_2": ((), torch.float32),
        }
        if self.input_scale:
            out["input_scale"] = ((), torch.float32)
        return out

    def dequantize(self, layer, dtype, out=None):
        return dequantize_nvfp4(layer.weight, layer.weight_scale, layer.weight_scale_2, dtype, out=out)

    def matmul(self, layer, x):
        # FP4 tensor cores exist on Blackwell (SM 10.x / 12.x) only. This path goes through
        # comfy-kitchen's kernels and has not been run on such a GPU by this project's tests.
        ck = _comfy_kitchen()
        if ck is None or _capability(x.device) < (10, 0) or x.dtype not in (torch.bfloat16, torch.float16):
            return None
        x2 = x.reshape(-1, x.shape[-1])
        if self.input_scale:
            scale = layer.input_scale
        else:  # dynamic per-tensor activation scale, kept on the device (no host sync)
            scale = (x2.abs().amax().float() / (FP8_MAX * 6.0)).clamp(min=1e-12)
        qx, block_x = ck.quantize_nvfp4(x2, scale, pad_16x=True)
        y = ck.scaled_mm_nvfp4(
            qx,
            layer.weight,
            tensor_scale_a=scale,
            tensor_scale_b=layer.weight_scale_2,
            block_scale_a=block_x,
            block_scale_b=layer.weight_scale,
            out_dtype=x.dtype,
        )
        return y[: x2.shape[0]].reshape(*x.shape[:-1], layer.out_features)

    def bits_per_weight(self, in_features):
        return 4.0 + 8.0 / 16


@dataclass(frozen=True)
class GGUFFormat(QuantFormat):
    """A GGML block type (Q8_0, Q4_K, ...): rows of independent blocks, decoded per layer."""

    qtype: GGMLType | None = None

    def layout(self, out_features: int, in_features: int) -> Layout:
        return {"weight": ((out_features, self.qtype.row_bytes(in_features)), torch.uint8)}

    def dequantize(self, layer, dtype, out=None):
        shape = (layer.out_features, layer.in_features)
        return dequantize_ggml(layer.weight, self.qtype, shape, dtype, out=out)

    def bits_per_weight(self, in_features):
        return self.qtype.bits_per_weight


def fp8_format(
    weight_dtype: torch.dtype = torch.float8_e4m3fn, per_row: bool = False, input_scale: bool = False
) -> FP8Format:
    name = {torch.float8_e4m3fn: "FP8_E4M3", torch.float8_e5m2: "FP8_E5M2"}[weight_dtype]
    return FP8Format(name + ("_ROW" if per_row else ""), weight_dtype, per_row, input_scale)


def nvfp4_format(input_scale: bool = False) -> NVFP4Format:
    return NVFP4Format("NVFP4", input_scale)


def gguf_format(qtype: GGMLType) -> GGUFFormat:
    return GGUFFormat(qtype.name, qtype)
