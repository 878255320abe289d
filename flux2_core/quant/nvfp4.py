"""NVFP4 weights: packed E2M1 (two per byte, high nibble first), an fp8 E4M3 scale per 16 values
stored in cuBLAS's swizzled block-scale layout, and one fp32 global scale (``weight_scale_2``).

W[r, c] = e2m1(q)[r, c] * float(block_scale[r, c // 16]) * weight_scale_2.
"""

from __future__ import annotations

import torch

BLOCK = 16
E2M1_MAX = 6.0
FP8_MAX = 448.0
_E2M1 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0])


def _ceil(a: int, b: int) -> int:
    return -(-a // b)


def swizzle_block_scales(s: torch.Tensor) -> torch.Tensor:
    """(R, C) scales -> cuBLAS tiled layout (ceil(R/128)*128, ceil(C/4)*4): 128x4 tiles, row = 32a + b
    stored at (b, a, c) inside each tile."""
    R, C = s.shape
    Rp, Cp = _ceil(R, 128) * 128, _ceil(C, 4) * 4
    p = torch.zeros((Rp, Cp), dtype=s.dtype, device=s.device)
    p[:R, :C] = s
    return p.view(Rp // 128, 4, 32, Cp // 4, 4).permute(0, 3, 2, 1, 4).reshape(Rp, Cp)


def unswizzle_block_scales(b: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """Inverse of ``swizzle_block_scales``, cropped to (rows, cols)."""
    Rp, Cp = b.shape
    t = b.reshape(Rp // 128, Cp // 4, 32, 4, 4).permute(0, 3, 2, 1, 4)  # (tileR, a, b, tileC, c)
    return t.reshape(Rp, Cp)[:rows, :cols]


def quantize_nvfp4(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Round-to-nearest NVFP4 quantization of a 2-D weight whose columns are a multiple of 16.

    Returns:
        (packed uint8 (R, C/2), swizzled fp8 block scales, scalar fp32 global scale).
    """
    R, C = w.shape
    w = w.float()
    global_scale = (w.abs().amax() / (FP8_MAX * E2M1_MAX)).clamp(min=1e-12)
    blocks = w.view(R, C // BLOCK, BLOCK)
    block_scale = (blocks.abs().amax(-1) / E2M1_MAX / global_scale).clamp(max=FP8_MAX).to(torch.float8_e4m3fn)
    total = (block_scale.float() * global_scale)[..., None]
    x = torch.where(total > 0, blocks / total.clamp(min=1e-30), torch.zeros_like(blocks)).view(R, C)
    mags = _E2M1[:8].to(w.device)
    idx = (x.abs()[..., None] - mags).abs().argmin(-1).to(torch.uint8)  # nearest magnitude
    idx = idx | ((x < 0).to(torch.uint8) << 3)
    packed = (idx[:, 0::2] << 4) | idx[:, 1::2]
    return packed, swizzle_block_scales(block_scale), global_scale.reshape(())


def dequantize_nvfp4(
    q: torch.Tensor,
    block_scale: torch.Tensor,
    global_scale: torch.Tensor,
    dtype: torch.dtype,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Dequantize packed NVFP4 (R, C/2) uint8 to (R, C) ``dtype`` (fp32 math, rounded once).

    Args:
        q: packed codes, high nibble first.
        block_scale: e4m3 scales in the tiled layout of ``swizzle_block_scales``.
        global_scale: scalar fp32 scale.
        dtype: output dtype.
        out: optional preallocated (R, C) output of ``dtype``.
    """
    R, C = q.shape[0], q.shape[1] * 2
    lut = _lut(q.device)
    if out is None:
        out = torch.empty((R, C), dtype=dtype, device=q.device)
    scales = unswizzle_block_scales(block_scale, R, C // BLOCK).float() * global_scale.float().to(q.device)
    step = max(1, (8 * 1024 * 1024) // C)  # row chunks bound the fp32 temporaries
    for i in range(0, R, step):
        b = q[i : i + step]
        codes = torch.stack((b >> 4, b & 0x0F), dim=-1).flatten(-2).long()  # (r, C), high nibble first
        vals = lut[codes].view(b.shape[0], C // BLOCK, BLOCK) * scales[i : i + step, :, None]
        out[i : i + step].copy_(vals.view(b.shape[0], C))
    return out


_LUTS: dict[torch.device, torch.Tensor] = {}


def _lut(device: torch.device) -> torch.Tensor:
    """The e2m1 code book on ``device``, copied there once (not on every dequantization)."""
    if device not in _LUTS:
        _LUTS[device] = _E2M1.to(device)
    return _LUTS[device]
