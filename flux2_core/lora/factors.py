"""The two shapes a LoRA update takes, built from the tensors of one LoRA module.

LowRank: delta W = scale x up @ down (up (out, r), down (r, in)); plain LoRA, and LoHa rewritten as one
    of rank r1 x r2: (w1a @ w1b) * (w2a @ w2b) = U @ D with U[o, (p, q)] = w1a[o, p] w2a[o, q] and
    D[(p, q), i] = w1b[p, i] w2b[q, i] (the Hadamard product of two low-rank matrices is low rank).
Kron: delta W = scale x kron(w1, w2) (LyCORIS LoKr), w1 (a, b), w2 (c, d) or w2_a (c, r) @ w2_b (r, d);
    applied without building delta W: (x viewed (.., b, d)) -> x @ w2^T (.., b, c) -> w1 @ that (.., a, c).

Scales (the rules of ComfyUI comfy/weight_adapter and kohya sd-scripts): LoRA alpha / rank, rank =
rows of down, no alpha -> 1; LoHa alpha / rows of w1_b; LoKr alpha / rank of the decomposed factor
(w2_b's rows if w2 is decomposed, else w1_b's), and 1 when both factors are full matrices or alpha
is absent. PEFT files carry no alpha tensor: their scale comes from the adapter metadata (loader.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .keys import Slot


@dataclass(frozen=True)
class LowRank:
    """delta W (out, in) = scale x up @ down.

    Attributes:
        down: (rank, in), as stored (often bf16; a view of the file).
        up: (out, rank), rows already in BFL order (a swapped module has its halves swapped back).
        scale: alpha / rank (or the PEFT / LoHa equivalent).
        slot: where the rows land in the target layer.
    """

    down: torch.Tensor
    up: torch.Tensor
    scale: float
    slot: Slot

    @property
    def in_features(self) -> int:
        return self.down.shape[1]

    @property
    def out_features(self) -> int:
        return self.up.shape[0]

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    def product(self, device: torch.device | str | None = None) -> torch.Tensor:
        """up @ down (without the scale) in fp32, (out, in), on ``device`` (default: the factors')."""
        up, down = (t.to(device=device, dtype=torch.float32) for t in (self.up, self.down))
        return up @ down

    def dense(self, device: torch.device | str | None = None) -> torch.Tensor:
        """scale x up @ down in fp32, (out, in)."""
        return self.product(device) * self.scale


@dataclass(frozen=True)
class Kron:
    """delta W (a c, b d) = scale x kron(w1, w2), w2 = w2_a @ w2_b when stored decomposed.

    Attributes:
        w1: (a, b) (w1_a @ w1_b already multiplied out: it is small).
        w2: (c, d), or None when decomposed.
        w2_a: (c, r) or None.
        w2_b: (r, d) or None.
        scale: see the module docstring.
        slot: where the rows land.
        swap: the output's two halves are swapped into BFL order when applied.
    """

    w1: torch.Tensor
    w2: torch.Tensor | None
    w2_a: torch.Tensor | None
    w2_b: torch.Tensor | None
    scale: float
    slot: Slot
    swap: bool = False

    @property
    def w2_shape(self) -> tuple[int, int]:
        if self.w2 is not None:
            return tuple(self.w2.shape)
        return self.w2_a.shape[0], self.w2_b.shape[1]

    @property
    def in_features(self) -> int:
        return self.w1.shape[1] * self.w2_shape[1]

    @property
    def out_features(self) -> int:
        return self.w1.shape[0] * self.w2_shape[0]

    def w2_dense(self, device: torch.device | str | None = None) -> torch.Tensor:
        if self.w2 is not None:
            return self.w2.to(device=device, dtype=torch.float32)
        return self.w2_a.to(device=device, dtype=torch.float32) @ self.w2_b.to(
            device=device, dtype=torch.float32
        )

    def product(self, device: torch.device | str | None = None) -> torch.Tensor:
        """kron(w1, w2) (without the scale) in fp32, (out, in), halves swapped when ``swap``."""
        d = torch.kron(self.w1.to(device=device, dtype=torch.float32), self.w2_dense(device))
        return swap_rows(d) if self.swap else d

    def dense(self, device: torch.device | str | None = None) -> torch.Tensor:
        """scale x kron(w1, w2) in fp32, (out, in)."""
        return self.product(device) * self.scale


Delta = LowRank | Kron


def swap_rows(t: torch.Tensor) -> torch.Tensor:
    """The two row halves of t (dim 0) exchanged."""
    a, b = t.chunk(2, dim=0)
    return torch.cat((b, a), dim=0)


def loha_as_low_rank(
    w1a: torch.Tensor, w1b: torch.Tensor, w2a: torch.Tensor, w2b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(up (out, r1 r2), down (r1 r2, in)) with up @ down = (w1a @ w1b) * (w2a @ w2b), in fp32."""
    up = (w1a.float()[:, :, None] * w2a.float()[:, None, :]).flatten(1)  # (out, r1, r2) -> (out, r1 r2)
    down = (w1b.float()[:, None, :] * w2b.float()[None, :, :]).flatten(0, 1)  # (r1 r2, in)
    return up, down


def kron_apply(
    x: torch.Tensor,
    w1: torch.Tensor,
    w2: torch.Tensor | None,
    w2_a: torch.Tensor | None,
    w2_b: torch.Tensor | None,
) -> torch.Tensor:
    """kron(w1, w2) applied to x (..., b d) -> (..., a c) without forming the Kronecker product.

    kron(w1, w2)[i c + k, j d + l] = w1[i, j] w2[k, l], so with X = x viewed (..., b, d):
    y[..., i, k] = sum_j w1[i, j] (X @ w2^T)[..., j, k].
    """
    b = w1.shape[1]
    xs = x.unflatten(-1, (b, -1))  # (..., b, d)
    if w2 is not None:
        t = xs @ w2.t()  # (..., b, c)
    else:
        t = (xs @ w2_b.t()) @ w2_a.t()
    return (w1 @ t).flatten(-2)  # (..., a, c) -> (..., a c)
