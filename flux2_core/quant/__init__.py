"""FP8 / NVFP4 weight formats: dequantization and an FP8 linear layer."""

from .fp8 import dequantize_fp8, quantize_fp8
from .linear import FP8Linear
from .nvfp4 import dequantize_nvfp4, quantize_nvfp4

__all__ = ["FP8Linear", "dequantize_fp8", "dequantize_nvfp4", "quantize_fp8", "quantize_nvfp4"]
