"""One reusable buffer per (device, dtype) that quantized layers dequantize their weight into.

Layers run one after another on one compute stream, so a layer's dequantized weight is consumed
by its matmul before the next layer writes the buffer (stream order guarantees it on the GPU). The
buffer only grows: after the first step it is as large as the largest layer and stays allocated,
so dequantization never allocates inside a step. Under ``torch.compile`` the compiler plans memory
itself, so traced code gets a fresh tensor instead.
"""

from __future__ import annotations

import math

import torch

_BUFFERS: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}


def scratch(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A ``shape`` view of the shared buffer for ``device``/``dtype`` (contents undefined).

    Args:
        shape: the dequantized weight's shape, e.g. (out_features, in_features).
        dtype: the activation dtype.
        device: the weight's device.
    """
    if torch.compiler.is_compiling():
        return torch.empty(shape, dtype=dtype, device=device)
    n = math.prod(shape)
    key = (device, dtype)
    buf = _BUFFERS.get(key)
    if buf is None or buf.numel() < n:
        _BUFFERS.pop(key, None)  # free the old one before allocating the larger one
        # A normal tensor even when the first call runs under torch.inference_mode(): an inference
        # tensor could not be written to by a later call outside inference mode (no_grad, training).
        with torch.inference_mode(False):
            buf = _BUFFERS[key] = torch.empty(n, dtype=dtype, device=device)
    return buf[:n].view(shape)


def release_scratch(device: torch.device | None = None) -> None:
    """Drop the scratch buffers (of one device, or all): e.g. when a model is unloaded."""
    for key in [k for k in _BUFFERS if device is None or k[0] == device]:
        del _BUFFERS[key]


def scratch_bytes() -> int:
    """Bytes held by all scratch buffers (for memory reports)."""
    return sum(b.numel() * b.element_size() for b in _BUFFERS.values())
