"""Quantized weight formats (FP8, NVFP4, GGUF): storage tables, dequantization and Linear layers."""

from .formats import FP8Format, GGUFFormat, NVFP4Format, QuantFormat, fp8_format, gguf_format, nvfp4_format
from .fp8 import dequantize_fp8, quantize_fp8
from .ggml import GGML_TYPES, GGMLType, dequantize_ggml, ggml_type
from .linear import FP8Linear, GGUFLinear, NVFP4Linear, QuantLinear
from .nvfp4 import dequantize_nvfp4, quantize_nvfp4
from .summary import format_quant_summary, quant_summary
from .swap import quant_layer, swap_linears

__all__ = [
    "GGML_TYPES",
    "FP8Format",
    "FP8Linear",
    "GGMLType",
    "GGUFFormat",
    "GGUFLinear",
    "NVFP4Format",
    "NVFP4Linear",
    "QuantFormat",
    "QuantLinear",
    "dequantize_fp8",
    "dequantize_ggml",
    "dequantize_nvfp4",
    "format_quant_summary",
    "fp8_format",
    "ggml_type",
    "gguf_format",
    "nvfp4_format",
    "quant_layer",
    "quant_summary",
    "quantize_fp8",
    "quantize_nvfp4",
    "swap_linears",
]
