"""Reference-token KV cache of the klein 9B-KV variant.

On the first step the sequence is [txt; ref; img]: ref tokens are modulated at t = 0 and attend only
to ref keys, while txt and img queries attend to everything. Each block's post-RoPE ref K/V are kept
here; later steps drop the ref tokens and splice the cached K/V between the txt and img keys.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .model.layers import sdpa


@dataclass
class Flux2KVCache:
    """Per-block ref K/V, each (B, R, heads, D), filled by the first forward that gets ``ref_img``."""

    double: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    single: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    num_ref_tokens: int = 0

    @property
    def filled(self) -> bool:
        return self.num_ref_tokens > 0

    def clear(self) -> None:
        """Forget the cached references (call before a new image or new references)."""
        self.double.clear()
        self.single.clear()
        self.num_ref_tokens = 0

    def nbytes(self) -> int:
        return sum(
            t.numel() * t.element_size() for d in (self.double, self.single) for kv in d.values() for t in kv
        )


class RefExtractAttention:
    """Attention over [txt; ref; img] where ref queries see only ref keys; optionally stores ref K/V."""

    def __init__(self, num_txt: int, num_ref: int, store: dict | None = None, index: int = 0):
        self.num_txt, self.num_ref, self.store, self.index = num_txt, num_ref, store, index

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        a, b = self.num_txt, self.num_txt + self.num_ref
        if self.store is not None:
            self.store[self.index] = (k[:, a:b].contiguous(), v[:, a:b].contiguous())
        q_other = torch.cat((q[:, :a], q[:, b:]), dim=1)
        out_other = sdpa(q_other, k, v)  # (B, L - R, h, D)
        out_ref = sdpa(q[:, a:b], k[:, a:b], v[:, a:b])
        return torch.cat((out_other[:, :a], out_ref, out_other[:, a:]), dim=1)


class RefCachedAttention:
    """Attention over [txt; img] queries with cached ref K/V inserted between txt and img keys."""

    def __init__(self, num_txt: int, k_ref: torch.Tensor, v_ref: torch.Tensor):
        self.num_txt, self.k_ref, self.v_ref = num_txt, k_ref, v_ref

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        a = self.num_txt
        k = torch.cat((k[:, :a], self.k_ref.to(k.dtype), k[:, a:]), dim=1)
        v = torch.cat((v[:, :a], self.v_ref.to(v.dtype), v[:, a:]), dim=1)
        return sdpa(q, k, v)
