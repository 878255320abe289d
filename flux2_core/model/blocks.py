"""Double-stream and single-stream FLUX.2 blocks and the final layer.

Blocks hold only their own weights: the shared modulation, the RoPE tables and the attention
function come in as arguments, so a weight streamer can page a block in and out around its forward.
Module names equal the BFL checkpoint keys.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..config import Flux2Config
from .embeddings import ModulationOut
from .layers import Attention, QKNorm, SwiGLU, sdpa
from .rope import Rope, fold_scales, norm_rope_qk


def _ln(x: torch.Tensor) -> torch.Tensor:
    return F.layer_norm(x, (x.shape[-1],), eps=1e-6)


def modulated_ln(x: torch.Tensor, mod: ModulationOut) -> torch.Tensor:
    """(1 + scale) * LN(x) + shift; x (B, L, H)."""
    return mod.modulate(_ln(x))


class SelfAttention(nn.Module):
    """Weights of one stream's attention: fused ``qkv`` (3H laid out (3, heads, 128)), QK-norm, ``proj``."""

    def __init__(self, hidden: int, head_dim: int, dtype=None, device=None):
        super().__init__()
        self.qkv = nn.Linear(hidden, 3 * hidden, bias=False, dtype=dtype, device=device)
        self.norm = QKNorm(head_dim, dtype, device)
        self.proj = nn.Linear(hidden, hidden, bias=False, dtype=dtype, device=device)

    def scales(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.norm.query_norm.scale, self.norm.key_norm.scale


def _mlp(hidden: int, mlp_hidden: int, dtype, device) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(hidden, 2 * mlp_hidden, bias=False, dtype=dtype, device=device),
        SwiGLU(),
        nn.Linear(mlp_hidden, hidden, bias=False, dtype=dtype, device=device),
    )


class DoubleStreamBlock(nn.Module):
    """Separate img / txt weights, joint attention over [txt; img].

    The forward runs in two stages around the attention call (``double_pre``: LN + modulation, qkv,
    QK-norm + RoPE; ``double_post``: projections, gates, residuals and the MLPs), so the fast path can
    compile or swap the stages while any attention function (plain, KV-cached, quantized) runs between
    them.
    """

    def __init__(self, config: Flux2Config, dtype=None, device=None):
        super().__init__()
        H, D = config.hidden_size, config.head_dim
        self.num_heads = config.num_heads
        self.img_attn = SelfAttention(H, D, dtype, device)
        self.img_mlp = _mlp(H, config.mlp_hidden, dtype, device)
        self.txt_attn = SelfAttention(H, D, dtype, device)
        self.txt_mlp = _mlp(H, config.mlp_hidden, dtype, device)

    def forward(
        self,
        img: torch.Tensor,
        txt: torch.Tensor,
        mod_img: tuple[ModulationOut, ModulationOut],
        mod_txt: tuple[ModulationOut, ModulationOut],
        rope: Rope,
        attn: Attention = sdpa,
        stages: BlockStages | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Args: img (B, Li, H), txt (B, Lt, H); modulation (attn set, mlp set) per stream; rope
        tables of the sequence [txt; img]; ``stages`` the fast path's versions of the two stages (None:
        the eager ones). Returns the updated (img, txt)."""
        st = stages or EAGER_STAGES
        q, k, v = st.double_pre(self, img, txt, mod_img, mod_txt, rope)
        out = attn(q, k, v)  # (B, L, h, D)
        del q, k, v
        return st.double_post(self, img, txt, out, mod_img, mod_txt)


def double_pre(
    block: DoubleStreamBlock,
    img: torch.Tensor,
    txt: torch.Tensor,
    mod_img: tuple[ModulationOut, ModulationOut],
    mod_txt: tuple[ModulationOut, ModulationOut],
    rope: Rope,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """LN + modulation, qkv of both streams, QK-norm + RoPE. Returns q, k, v, each (B, L, h, D)."""
    n_txt = txt.shape[1]
    img_qkv = block.img_attn.qkv(mod_img[0].modulate(_ln(img)))  # (B, Li, 3H)
    txt_qkv = block.txt_attn.qkv(mod_txt[0].modulate(_ln(txt)))  # (B, Lt, 3H)
    qkv = torch.cat((txt_qkv, img_qkv), dim=1).unflatten(-1, (3, block.num_heads, -1))  # (B, L, 3, h, D)
    del img_qkv, txt_qkv
    tables = fold_scales(rope, [(*block.txt_attn.scales(), n_txt), (*block.img_attn.scales(), img.shape[1])])
    qk = norm_rope_qk(qkv[:, :, :2], tables, qkv.dtype)  # (B, L, 2, h, D)
    return qk[:, :, 0], qk[:, :, 1], qkv[:, :, 2]


def double_post(
    block: DoubleStreamBlock,
    img: torch.Tensor,
    txt: torch.Tensor,
    out: torch.Tensor,
    mod_img: tuple[ModulationOut, ModulationOut],
    mod_txt: tuple[ModulationOut, ModulationOut],
    adaln: Callable[[torch.Tensor, ModulationOut], torch.Tensor] = modulated_ln,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention output (B, L, h, D) -> projections, gated residuals, MLPs. Returns (img, txt).

    ``adaln`` is the MLPs' LN + modulation (the fast path passes a fused one).
    """
    n_txt = txt.shape[1]
    out = out.flatten(2)  # (B, L, H)
    img = torch.addcmul(img, mod_img[0].gate, block.img_attn.proj(out[:, n_txt:]))
    img = torch.addcmul(img, mod_img[1].gate, block.img_mlp(adaln(img, mod_img[1])))
    txt = torch.addcmul(txt, mod_txt[0].gate, block.txt_attn.proj(out[:, :n_txt]))
    txt = torch.addcmul(txt, mod_txt[1].gate, block.txt_mlp(adaln(txt, mod_txt[1])))
    return img, txt


class SingleStreamBlock(nn.Module):
    """One stream over [txt; img]: ``linear1`` -> (qkv 3H | mlp 2M), attention and SwiGLU in parallel.

    Two stages around the attention call, as in ``DoubleStreamBlock``.
    """

    def __init__(self, config: Flux2Config, dtype=None, device=None):
        super().__init__()
        H, M = config.hidden_size, config.mlp_hidden
        self.num_heads = config.num_heads
        self.split = (3 * H, 2 * M)
        self.linear1 = nn.Linear(H, 3 * H + 2 * M, bias=False, dtype=dtype, device=device)
        self.linear2 = nn.Linear(H + M, H, bias=False, dtype=dtype, device=device)
        self.norm = QKNorm(config.head_dim, dtype, device)

    def forward(
        self,
        x: torch.Tensor,
        mod: ModulationOut,
        rope: Rope,
        attn: Attention = sdpa,
        stages: BlockStages | None = None,
    ) -> torch.Tensor:
        """Args: x (B, L, H) = [txt; img]; mod its (shift, scale, gate); rope tables of x; ``stages``
        as in ``DoubleStreamBlock.forward``. Returns (B, L, H)."""
        st = stages or EAGER_STAGES
        q, k, v, h = st.single_pre(self, x, mod, rope)
        out = attn(q, k, v)  # (B, L, h, D)
        del q, k, v
        # Handed over in a list the post stage empties, so that it can free h (the largest activation)
        # before linear2: arguments passed directly would stay alive in this frame until it returns.
        parts = [out, h]
        del out, h
        return st.single_post(self, x, parts, mod)


def single_pre(
    block: SingleStreamBlock, x: torch.Tensor, mod: ModulationOut, rope: Rope
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """LN + modulation, ``linear1``, QK-norm + RoPE. Returns q, k, v (B, L, h, D) and the linear1
    output (B, L, 3H + 2M), whose MLP half the post stage needs."""
    h = block.linear1(mod.modulate(_ln(x)))  # (B, L, 3H + 2M)
    qkv = h[..., : block.split[0]].unflatten(-1, (3, block.num_heads, -1))  # (B, L, 3, h, D)
    tables = fold_scales(rope, [(block.norm.query_norm.scale, block.norm.key_norm.scale, x.shape[1])])
    qk = norm_rope_qk(qkv[:, :, :2], tables, qkv.dtype)
    return qk[:, :, 0], qk[:, :, 1], qkv[:, :, 2], h


def single_post(
    block: SingleStreamBlock, x: torch.Tensor, parts: list[torch.Tensor], mod: ModulationOut
) -> torch.Tensor:
    """[attention | SwiGLU(mlp half of h)] -> ``linear2`` -> gated residual.

    Args:
        parts: [attention output (B, L, h, D), linear1 output h (B, L, 3H + 2M)]; emptied here.

    Returns:
        (B, L, H).
    """
    out, h = parts
    parts.clear()
    out = out.flatten(2)  # (B, L, H)
    H = out.shape[-1]
    gate, up = h[..., block.split[0] :].chunk(2, dim=-1)
    if torch.compiler.is_compiling():
        # The compiler writes both parts straight into the concatenated buffer (no out= on a view:
        # tracing does not support it).
        both = torch.cat((out, F.silu(gate) * up), dim=-1)
    else:
        # linear2 input built in one buffer instead of a cat of two temporaries.
        both = torch.empty((*out.shape[:-1], H + block.split[1] // 2), dtype=out.dtype, device=out.device)
        both[..., :H] = out
        torch.mul(F.silu(gate), up, out=both[..., H:])
    del out, h, gate, up
    return torch.addcmul(x, mod.gate, block.linear2(both))


@dataclass(frozen=True)
class BlockStages:
    """The four stage functions the blocks call; the fast path supplies compiled or fused versions
    with the same signatures (the eager ones below are the reference)."""

    double_pre: Callable
    double_post: Callable
    single_pre: Callable
    single_post: Callable


EAGER_STAGES = BlockStages(double_pre, double_post, single_pre, single_post)


class LastLayer(nn.Module):
    """LN -> modulate with (shift, scale) from ``adaLN_modulation`` -> ``linear`` to latent channels."""

    def __init__(self, hidden: int, out_channels: int, dtype=None, device=None):
        super().__init__()
        self.adaLN_modulation = nn.Sequential(
            nn.SiLU(), nn.Linear(hidden, 2 * hidden, bias=False, dtype=dtype, device=device)
        )
        self.linear = nn.Linear(hidden, out_channels, bias=False, dtype=dtype, device=device)

    def forward(self, x: torch.Tensor, vec: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(vec)[:, None].chunk(2, dim=-1)  # BFL order: shift, scale
        return self.linear(torch.addcmul(shift, _ln(x), 1 + scale))
