"""Block stages with comfy-kitchen's fused kernels: the fast path where torch.compile cannot run.

comfy-kitchen (installed by ComfyUI's requirements, with compiled CUDA kernels, so also where Triton
is missing) provides ``adaln(x, scale, shift)`` = layer_norm(x) * (1 + scale) + shift in one kernel
and ``rms_rope(q, k, freqs, q_scale, k_scale)`` = per-head RMSNorm with learned scales followed by the
interleaved rotation, for q and k in one launch. Everything else (the linears, gates, residuals,
SwiGLU) is the eager code. The stage signatures equal the eager ones (``model.blocks``).

q and k are made contiguous before ``rms_rope``: the kernels take (B, L, heads, D) tensors and we do
not rely on them honouring the strides of a view into the fused qkv projection.
"""

from __future__ import annotations

import torch

from ..model.blocks import EAGER_STAGES, BlockStages, DoubleStreamBlock, SingleStreamBlock, double_post
from ..model.embeddings import ModulationOut
from ..model.rope import Rope

_EPS = 1e-6


def _ck():
    import comfy_kitchen

    return comfy_kitchen


def _adaln(x: torch.Tensor, mod: ModulationOut) -> torch.Tensor:
    """(1 + scale) * LN(x) + shift, fused. x (B, L, H); scale and shift (B, 1, H) or (B, L, H)."""
    return _ck().adaln(x, mod.scale, mod.shift, _EPS)


def _rms_rope(
    qkv: torch.Tensor, freqs: torch.Tensor, q_scale: torch.Tensor, k_scale: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """qkv (B, L, 3, heads, D) of one segment, freqs (B, L, 1, D/2, 2, 2) -> normalised, rotated q, k."""
    q, k = qkv[:, :, 0].contiguous(), qkv[:, :, 1].contiguous()  # (B, L, heads, D)
    return _ck().rms_rope(q, k, freqs.contiguous(), q_scale, k_scale, _EPS)


def kitchen_double_pre(
    block: DoubleStreamBlock,
    img: torch.Tensor,
    txt: torch.Tensor,
    mod_img: tuple[ModulationOut, ModulationOut],
    mod_txt: tuple[ModulationOut, ModulationOut],
    rope: Rope,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``blocks.double_pre`` with fused adaln and rms_rope. Returns q, k, v (B, L, h, D)."""
    n_txt = txt.shape[1]
    freqs = rope.freqs_cis()  # (B, L, 1, D/2, 2, 2), [txt; img]
    img_qkv = block.img_attn.qkv(_adaln(img, mod_img[0])).unflatten(-1, (3, block.num_heads, -1))
    txt_qkv = block.txt_attn.qkv(_adaln(txt, mod_txt[0])).unflatten(-1, (3, block.num_heads, -1))
    q_t, k_t = _rms_rope(txt_qkv, freqs[:, :n_txt], *block.txt_attn.scales())
    q_i, k_i = _rms_rope(img_qkv, freqs[:, n_txt:], *block.img_attn.scales())
    q = torch.cat((q_t, q_i), dim=1)
    del q_t, q_i
    k = torch.cat((k_t, k_i), dim=1)
    del k_t, k_i
    v = torch.cat((txt_qkv[:, :, 2], img_qkv[:, :, 2]), dim=1)
    return q, k, v


def kitchen_double_post(
    block: DoubleStreamBlock,
    img: torch.Tensor,
    txt: torch.Tensor,
    out: torch.Tensor,
    mod_img: tuple[ModulationOut, ModulationOut],
    mod_txt: tuple[ModulationOut, ModulationOut],
) -> tuple[torch.Tensor, torch.Tensor]:
    """``blocks.double_post`` with the MLPs' LN + modulation fused."""
    return double_post(block, img, txt, out, mod_img, mod_txt, adaln=_adaln)


def kitchen_single_pre(
    block: SingleStreamBlock, x: torch.Tensor, mod: ModulationOut, rope: Rope
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``blocks.single_pre`` with fused adaln and rms_rope."""
    h = block.linear1(_adaln(x, mod))  # (B, L, 3H + 2M)
    qkv = h[..., : block.split[0]].unflatten(-1, (3, block.num_heads, -1))  # (B, L, 3, h, D)
    q, k = _rms_rope(qkv, rope.freqs_cis(), block.norm.query_norm.scale, block.norm.key_norm.scale)
    return q, k, qkv[:, :, 2], h


KITCHEN_STAGES = BlockStages(
    kitchen_double_pre, kitchen_double_post, kitchen_single_pre, EAGER_STAGES.single_post
)
