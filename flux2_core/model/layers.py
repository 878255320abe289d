"""Small building blocks: QK-norm scales, SwiGLU, attention over (B, heads, L, D)."""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn


class RMSScale(nn.Module):
    """Learnable RMSNorm weight over the head dim (stored as ``.scale`` in BFL files)."""

    def __init__(self, dim: int, dtype=None, device=None):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(dim, dtype=dtype, device=device))


class QKNorm(nn.Module):
    """``query_norm`` / ``key_norm`` scales; the normalisation itself is fused with RoPE."""

    def __init__(self, dim: int, dtype=None, device=None):
        super().__init__()
        self.query_norm = RMSScale(dim, dtype, device)
        self.key_norm = RMSScale(dim, dtype, device)


class SwiGLU(nn.Module):
    """SiLU of the first half gating the second half: (…, 2M) -> (…, M)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = x.chunk(2, dim=-1)
        return F.silu(a) * b


class Attention(Protocol):
    """How a block attends: plain joint attention, or the KV-variant reference handling."""

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor: ...


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Joint attention, no mask.

    Args:
        q, k, v: (B, L, heads, D) (any strides with a contiguous last dim).

    Returns:
        (B, L, heads, D).
    """
    # SDPA takes (B, heads, L, D); its flash/cuDNN kernels keep (B, L, heads, D) memory, so both
    # transposes are free views and the output reshapes to (B, L, H) without a copy.
    return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(
        1, 2
    )
