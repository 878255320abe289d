"""Which storage format a text encoder's decoder Linear keeps (FP8 or a GGUF type), or None for dense.

ComfyUI's fp8 text encoders keep every decoder Linear weight as float8 with one fp32 scale per
tensor (or per row): W ~= float(W8) * scale. GGUF encoders keep each quantized Linear in its GGML
type. Those layers become ``FP8Linear`` / ``GGUFLinear`` (one quantized-layer family shared with
the transformer, ``flux2_core.quant``): the stored bytes stay resident and are streamed as they
are; the full-precision weight exists only while its layer computes.
"""

from __future__ import annotations

import torch

from ..quant.formats import QuantFormat, fp8_format, gguf_format
from ..quant.linear import FP8Linear

_FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)

# The name the text encoders used for the FP8 layer before the families were merged.
Fp8Linear = FP8Linear


def layer_format(reader, key: str, scale_key: str | None) -> QuantFormat | None:
    """The storage format a decoder Linear keeps, from how ``key`` is stored.

    Args:
        reader: the checkpoint reader (``GGUFTextReader`` for GGUF files).
        key: the file key of the Linear's weight.
        scale_key: the file key of its fp8 scale, if the file has one.

    Returns:
        An FP8 or GGUF format, or None when the weight is stored in a plain float dtype.
    """
    if hasattr(reader, "is_quantized"):  # GGUF: every quantized GGML type stays as stored
        return gguf_format(reader.ggml(key)) if reader.is_quantized(key) else None
    dtype = reader.dtype(key)
    if dtype not in _FP8_DTYPES:
        return None
    per_row = scale_key is not None and reader.nbytes(scale_key) > 4
    return fp8_format(dtype, per_row=per_row, input_scale=False)
