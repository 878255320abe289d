"""Scaled float8 weights: W ~= float(W8) * weight_scale, one fp32 scale per tensor or per output row."""

from __future__ import annotations

import torch

FP8_MAX = 448.0  # largest float8_e4m3fn value
# Rows dequantized at a time: bounds the fp32 temporary to ~64 MB whatever the layer size.
_CHUNK_ELEMS = 16 * 1024 * 1024


def quantize_fp8(
    w: torch.Tensor, dtype: torch.dtype = torch.float8_e4m3fn, per_row: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Round-to-nearest float8 quantization with scale amax / 448.

    Args:
        w: the weight (out, in).
        dtype: the float8 dtype.
        per_row: one scale per output row ((out, 1)) instead of one scalar.

    Returns:
        (float8 weight, fp32 scale of shape () or (out, 1)).
    """
    amax = w.detach().abs().float().amax(dim=1, keepdim=True) if per_row else w.detach().abs().amax().float()
    scale = (amax / FP8_MAX).clamp(min=1e-12)
    q = (w.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(dtype)
    return q, scale if per_row else scale.reshape(())


def dequantize_fp8(
    q: torch.Tensor, scale: torch.Tensor | None, dtype: torch.dtype, out: torch.Tensor | None = None
) -> torch.Tensor:
    """``float(q) * scale`` computed in fp32 (row chunks) and rounded once to ``dtype``.

    Args:
        q: float8 weight (out, in) (any float8 dtype; 1-D tensors too).
        scale: scalar, (1,), (out,) or (out, 1) fp32 scale; None means 1.
        dtype: output dtype.
        out: optional preallocated output (``q``'s shape, ``dtype``).
    """
    if out is None:
        out = torch.empty(q.shape, dtype=dtype, device=q.device)
    s = None if scale is None else scale.to(device=q.device, dtype=torch.float32)
    if q.dim() < 2:
        out.copy_(q.float() * (1.0 if s is None else s.reshape(-1)))
        return out
    per_row = s is not None and s.numel() > 1
    if per_row:
        s = s.reshape(-1, 1)
    elif s is not None:
        s = s.reshape(())
    rows = max(1, _CHUNK_ELEMS // max(1, q[0].numel()))
    for i in range(0, q.shape[0], rows):
        part = q[i : i + rows].float()
        if s is not None:
            part = part * (s[i : i + rows] if per_row else s)
        out[i : i + rows].copy_(part)
    return out
