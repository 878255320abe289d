"""Timestep / guidance embeddings and the shared modulation projections."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn


def timestep_embedding(t: torch.Tensor, dim: int = 256, max_period: float = 10000.0, factor: float = 1000.0):
    """Sinusoidal embedding of ``factor * t`` in fp32, ordered [cos, sin].

    Args:
        t: (B,) values (sigmas in [0, 1] or guidance scales).

    Returns:
        (B, dim) fp32.
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = (t.float() * factor)[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class MLPEmbedder(nn.Module):
    """in_layer -> SiLU -> out_layer (``time_in`` / ``guidance_in``)."""

    def __init__(self, in_dim: int, hidden: int, dtype=None, device=None):
        super().__init__()
        self.in_layer = nn.Linear(in_dim, hidden, bias=False, dtype=dtype, device=device)
        self.out_layer = nn.Linear(hidden, hidden, bias=False, dtype=dtype, device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out_layer(nn.functional.silu(self.in_layer(x)))


@dataclass
class ModulationOut:
    """One (shift, scale, gate) set, each (B, 1, H) or per token (B, L, H)."""

    shift: torch.Tensor
    scale: torch.Tensor
    gate: torch.Tensor

    def modulate(self, x_norm: torch.Tensor) -> torch.Tensor:
        """(1 + scale) * x_norm + shift."""
        return torch.addcmul(self.shift, x_norm, 1 + self.scale)

    @staticmethod
    def cat(parts: list[tuple[ModulationOut, int]]) -> ModulationOut:
        """Per-token modulation for consecutive token ranges (each (mod, length))."""

        def one(field: str) -> torch.Tensor:
            ts = [getattr(m, field).expand(-1, n, -1) for m, n in parts]
            return torch.cat(ts, dim=1)

        return ModulationOut(one("shift"), one("scale"), one("gate"))


class Modulation(nn.Module):
    """Shared modulation: ``lin`` H -> sets*3H on SiLU(vec), split into ``sets`` ModulationOut."""

    def __init__(self, hidden: int, sets: int, dtype=None, device=None):
        super().__init__()
        self.sets = sets
        self.lin = nn.Linear(hidden, 3 * sets * hidden, bias=False, dtype=dtype, device=device)

    def forward(self, vec: torch.Tensor) -> tuple[ModulationOut, ...]:
        out = self.lin(nn.functional.silu(vec))[:, None, :]  # (B, 1, sets*3H)
        chunks = out.chunk(3 * self.sets, dim=-1)
        return tuple(ModulationOut(*chunks[3 * i : 3 * i + 3]) for i in range(self.sets))
