"""Per-tensor scaled float8 (E4M3) weights: W ~= float(W8) * weight_scale."""

from __future__ import annotations

import torch

FP8_MAX = 448.0
# Rows dequantized at a time: bounds the fp32 temporary to ~64 MB whatever the layer size.
_CHUNK_ELEMS = 16 * 1024 * 1024


def quantize_fp8(
    w: torch.Tensor, dtype: torch.dtype = torch.float8_e4m3fn
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize with one fp32 scale (amax / 448). Returns (fp8 weight, scalar fp32 scale)."""
    scale = (w.detach().abs().amax().float() / FP8_MAX).clamp(min=1e-12)
    q = (w.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(dtype)
    return q, scale.reshape(())


def dequantize_fp8(q: torch.Tensor, scale: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """``float(q) * scale`` computed in fp32 (row chunks) and rounded once to ``dtype``.

    Args:
        q: float8 weight (out, in) (any float8 dtype).
        scale: scalar (or broadcastable per-row (out, 1)) fp32 scale; None means 1.
        dtype: output dtype.
    """
    out = torch.empty(q.shape, dtype=dtype, device=q.device)
    s = None if scale is None else scale.to(device=q.device, dtype=torch.float32)
    per_row = s is not None and s.numel() > 1
    rows = max(1, _CHUNK_ELEMS // max(1, q[0].numel())) if q.dim() > 1 else q.shape[0] if q.dim() else 1
    if q.dim() < 2:
        return (q.float() * (1.0 if s is None else s)).to(dtype)
    for i in range(0, q.shape[0], rows):
        part = q[i : i + rows].float()
        if s is not None:
            part.mul_(s[i : i + rows] if per_row else s)
        out[i : i + rows] = part
    return out
