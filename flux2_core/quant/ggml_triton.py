"""Triton kernels that decode GGML blocks straight into the output dtype in one pass.

Each kernel reads a block's stored bytes once and writes its values once, in float32, float16 or
bfloat16: no float32 temporaries in memory, no chunking, one launch per layer. The arithmetic is
the torch decoders' (``ggml.py``) and so gguf-py's: every product there is exact in float32 (an
fp16 scale has 11 significant bits, the integer factors at most 13 more together, e.g. Q6_K
11 + 7 + 5 = 23 < 24), so the one rounding is the final add or subtract, whether or not the
compiler fuses it into an FMA; float16 output is the float32 value rounded once (hardware
round-to-nearest-even), bfloat16 output is rounded to nearest-even with integer ops on the float32
bits (the Triton interpreter's float32 -> bfloat16 cast truncates).

Index layout: a program decodes ``BPP`` blocks as a (BPP, S, 32) tile, S = 8 rows of 32 values for
the 256-value K-quants and S = 1 for the 32-value legacy types; value ``32 s + j`` of block ``b``
goes to ``dst[256 b + 32 s + j]``. Bytes are gathered per value (each nibble byte is read by two
values, each scale byte by 16 or 32): the repeats hit L1, so global traffic stays the stored bytes
plus the written values.

This module is imported only when the Triton decoder is chosen (``ggml.decoder_for``): with
``TRITON_INTERPRET=1`` set before the import the kernels run in Triton's CPU interpreter (tests).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .ggml import GGML_TYPES

# Output kinds (constexpr): the dtype the kernel stores.
_F32, _F16, _BF16 = 0, 1, 2
OUT_KIND = {torch.float32: _F32, torch.float16: _F16, torch.bfloat16: _BF16}


@triton.jit
def _half(ptr, mask):
    """Little-endian fp16 at ``ptr`` (uint8 pointers, any shape) -> float32 (subnormals exact)."""
    lo = tl.load(ptr, mask=mask, other=0).to(tl.int32)
    hi = tl.load(ptr + 1, mask=mask, other=0).to(tl.int32)
    return (lo | (hi << 8)).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def _byte(ptr, mask):
    """uint8 at ``ptr`` -> int32 in 0..255."""
    return tl.load(ptr, mask=mask, other=0).to(tl.int32)


@triton.jit
def _store(ptr, v, mask, OUT: tl.constexpr):
    """Store float32 ``v`` as float32 / float16 / bfloat16 (``ptr`` is int16 for bfloat16)."""
    if OUT == 0:
        tl.store(ptr, v, mask=mask)
    elif OUT == 1:
        tl.store(ptr, v.to(tl.float16), mask=mask)
    else:
        bits = v.to(tl.int32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)  # round to nearest, ties to even (finite values)
        tl.store(ptr, (bits >> 16).to(tl.int16), mask=mask)


# ----------------------------------------------------------------------------- legacy 32-blocks
@triton.jit
def _q8_0(src, dst, n, BPP: tl.constexpr, OUT: tl.constexpr):  # d f16 | 32 x int8
    b = tl.program_id(0).to(tl.int64) * BPP + tl.arange(0, BPP)[:, None]  # (BPP, 1)
    j = tl.arange(0, 32)[None, :]  # (1, 32)
    ok = b < n
    base = src + b * 34
    d = _half(base, ok)
    q = (_byte(base + 2 + j, ok) ^ 0x80) - 0x80  # int8
    _store(dst + b * 32 + j, q.to(tl.float32) * d, ok, OUT)


@triton.jit
def _q4_0(src, dst, n, BPP: tl.constexpr, OUT: tl.constexpr):  # d f16 | 16 nibble bytes (q - 8)
    b = tl.program_id(0).to(tl.int64) * BPP + tl.arange(0, BPP)[:, None]
    j = tl.arange(0, 32)[None, :]
    ok = b < n
    base = src + b * 18
    d = _half(base, ok)
    q = (_byte(base + 2 + (j % 16), ok) >> ((j // 16) * 4)) & 0x0F
    _store(dst + b * 32 + j, d * (q - 8).to(tl.float32), ok, OUT)


@triton.jit
def _q4_1(src, dst, n, BPP: tl.constexpr, OUT: tl.constexpr):  # d f16 | m f16 | 16 nibble bytes
    b = tl.program_id(0).to(tl.int64) * BPP + tl.arange(0, BPP)[:, None]
    j = tl.arange(0, 32)[None, :]
    ok = b < n
    base = src + b * 20
    d, m = _half(base, ok), _half(base + 2, ok)
    q = (_byte(base + 4 + (j % 16), ok) >> ((j // 16) * 4)) & 0x0F
    _store(dst + b * 32 + j, d * q.to(tl.float32) + m, ok, OUT)


@triton.jit
def _q5_0(src, dst, n, BPP: tl.constexpr, OUT: tl.constexpr):  # d f16 | qh u32 | nibbles (q - 16)
    b = tl.program_id(0).to(tl.int64) * BPP + tl.arange(0, BPP)[:, None]
    j = tl.arange(0, 32)[None, :]
    ok = b < n
    base = src + b * 22
    d = _half(base, ok)
    high = (_byte(base + 2 + j // 8, ok) >> (j % 8)) & 1  # bit j of the little-endian uint32
    q = ((_byte(base + 6 + (j % 16), ok) >> ((j // 16) * 4)) & 0x0F) | (high << 4)
    _store(dst + b * 32 + j, d * (q - 16).to(tl.float32), ok, OUT)


@triton.jit
def _q5_1(src, dst, n, BPP: tl.constexpr, OUT: tl.constexpr):  # d f16 | m f16 | qh u32 | nibbles
    b = tl.program_id(0).to(tl.int64) * BPP + tl.arange(0, BPP)[:, None]
    j = tl.arange(0, 32)[None, :]
    ok = b < n
    base = src + b * 24
    d, m = _half(base, ok), _half(base + 2, ok)
    high = (_byte(base + 4 + j // 8, ok) >> (j % 8)) & 1
    q = ((_byte(base + 8 + (j % 16), ok) >> ((j // 16) * 4)) & 0x0F) | (high << 4)
    _store(dst + b * 32 + j, d * q.to(tl.float32) + m, ok, OUT)


# ------------------------------------------------------------------------------ K-quants (256)
# Tile (BPP, 8, 32): s = row of 32 values (0..7), j = position in the row.
@triton.jit
def _q2_k(src, dst, n, BPP: tl.constexpr, OUT: tl.constexpr):  # 16 scales | 64 q bytes | d | dmin
    b = tl.program_id(0).to(tl.int64) * BPP + tl.arange(0, BPP)[:, None, None]
    s = tl.arange(0, 8)[None, :, None]
    j = tl.arange(0, 32)[None, None, :]
    ok = b < n
    base = src + b * 84
    d, dmin = _half(base + 80, ok), _half(base + 82, ok)
    sc = _byte(base + 2 * s + j // 16, ok)  # one scale byte per 16 values: low 4 bits scale, high min
    # value 128 h + 32 k + j (s = 4 h + k) sits at bits 2k of q byte 32 h + j
    q = (_byte(base + 16 + (s // 4) * 32 + j, ok) >> ((s % 4) * 2)) & 3
    dl = d * (sc & 0x0F).to(tl.float32)
    ml = dmin * (sc >> 4).to(tl.float32)
    _store(dst + b * 256 + s * 32 + j, dl * q.to(tl.float32) - ml, ok, OUT)


@triton.jit
def _q3_k(src, dst, n, BPP: tl.constexpr, OUT: tl.constexpr):  # hmask 32 | 64 q | 12 scales | d
    b = tl.program_id(0).to(tl.int64) * BPP + tl.arange(0, BPP)[:, None, None]
    s = tl.arange(0, 8)[None, :, None]
    j = tl.arange(0, 32)[None, None, :]
    ok = b < n
    base = src + b * 110
    d = _half(base + 108, ok)
    # 16 six-bit scales t: low 4 bits from byte t % 8 (low nibble for t < 8, high for t >= 8),
    # high 2 bits from byte 8 + t % 4 at bit 2 (t // 4)
    t = 2 * s + j // 16
    low = (_byte(base + 96 + t % 8, ok) >> ((t // 8) * 4)) & 0x0F
    high = (_byte(base + 104 + t % 4, ok) >> ((t // 4) * 2)) & 3
    scale = (low | (high << 4)) - 32
    ql = (_byte(base + 32 + (s // 4) * 32 + j, ok) >> ((s % 4) * 2)) & 3
    hbit = (_byte(base + j, ok) >> s) & 1  # set: no -4 offset
    q = ql - ((hbit ^ 1) << 2)
    _store(dst + b * 256 + s * 32 + j, (d * scale.to(tl.float32)) * q.to(tl.float32), ok, OUT)


@triton.jit
def _k_scale_min(base, s, ok):
    """Q4_K/Q5_K: six-bit scale and min of row ``s`` from the 12 bytes at ``base + 4``."""
    t = s % 4
    dq = _byte(base + 4 + t, ok)
    mq = _byte(base + 8 + t, ok)
    md = _byte(base + 12 + t, ok)
    sc = tl.where(s < 4, dq & 0x3F, (md & 0x0F) | ((dq >> 2) & 0x30))
    mn = tl.where(s < 4, mq & 0x3F, (md >> 4) | ((mq >> 2) & 0x30))
    return sc, mn


@triton.jit
def _q4_k(src, dst, n, BPP: tl.constexpr, OUT: tl.constexpr):  # d | dmin | 12 scales | 128 nibbles
    b = tl.program_id(0).to(tl.int64) * BPP + tl.arange(0, BPP)[:, None, None]
    s = tl.arange(0, 8)[None, :, None]
    j = tl.arange(0, 32)[None, None, :]
    ok = b < n
    base = src + b * 144
    d, dmin = _half(base, ok), _half(base + 2, ok)
    sc, mn = _k_scale_min(base, s, ok)  # (BPP, 8, 1)
    q = (_byte(base + 16 + (s // 2) * 32 + j, ok) >> ((s % 2) * 4)) & 0x0F
    dd = d * sc.to(tl.float32)
    dm = dmin * mn.to(tl.float32)
    _store(dst + b * 256 + s * 32 + j, dd * q.to(tl.float32) - dm, ok, OUT)


@triton.jit
def _q5_k(src, dst, n, BPP: tl.constexpr, OUT: tl.constexpr):  # d | dmin | 12 sc | qh 32 | 128 nib
    b = tl.program_id(0).to(tl.int64) * BPP + tl.arange(0, BPP)[:, None, None]
    s = tl.arange(0, 8)[None, :, None]
    j = tl.arange(0, 32)[None, None, :]
    ok = b < n
    base = src + b * 176
    d, dmin = _half(base, ok), _half(base + 2, ok)
    sc, mn = _k_scale_min(base, s, ok)
    low = (_byte(base + 48 + (s // 2) * 32 + j, ok) >> ((s % 2) * 4)) & 0x0F
    high = (_byte(base + 16 + j, ok) >> s) & 1  # bit s of byte j: 5th bit of value 32 s + j
    dd = d * sc.to(tl.float32)
    dm = dmin * mn.to(tl.float32)
    _store(dst + b * 256 + s * 32 + j, dd * (low | (high << 4)).to(tl.float32) - dm, ok, OUT)


@triton.jit
def _q6_k(src, dst, n, BPP: tl.constexpr, OUT: tl.constexpr):  # ql 128 | qh 64 | 16 int8 sc | d
    b = tl.program_id(0).to(tl.int64) * BPP + tl.arange(0, BPP)[:, None, None]
    s = tl.arange(0, 8)[None, :, None]
    j = tl.arange(0, 32)[None, None, :]
    ok = b < n
    base = src + b * 210
    d = _half(base + 208, ok)
    # value 128 h + 32 k + j (s = 4 h + k): nibble k // 2 of ql byte 64 h + 32 (k % 2) + j,
    # bits 2k of qh byte 32 h + j; one int8 scale per 16 values
    h, k = s // 4, s % 4
    low = (_byte(base + h * 64 + (k % 2) * 32 + j, ok) >> ((k // 2) * 4)) & 0x0F
    high = (_byte(base + 128 + h * 32 + j, ok) >> (k * 2)) & 3
    scale = (_byte(base + 192 + 2 * s + j // 16, ok) ^ 0x80) - 0x80
    q = (low | (high << 4)) - 32
    _store(dst + b * 256 + s * 32 + j, (d * scale.to(tl.float32)) * q.to(tl.float32), ok, OUT)


# type name -> (kernel, values per block, blocks per program): 4096 values per program either way
KERNELS = {
    "Q8_0": (_q8_0, 32, 128),
    "Q4_0": (_q4_0, 32, 128),
    "Q4_1": (_q4_1, 32, 128),
    "Q5_0": (_q5_0, 32, 128),
    "Q5_1": (_q5_1, 32, 128),
    "Q2_K": (_q2_k, 256, 16),
    "Q3_K": (_q3_k, 256, 16),
    "Q4_K": (_q4_k, 256, 16),
    "Q5_K": (_q5_k, 256, 16),
    "Q6_K": (_q6_k, 256, 16),
}

# The interpreter (CPU) runs programs one after another in Python, a few ms each whatever their
# size: bigger programs there keep the tests fast. Same kernels, same values.
INTERPRETER_BPP_FACTOR = 16


def blocks_per_program(name: str, device: torch.device) -> int:
    """Blocks one program decodes: 4096 values on the GPU (and 16 times more interpreted)."""
    return KERNELS[name][2] * (INTERPRETER_BPP_FACTOR if device.type == "cpu" else 1)


def decode_into(raw: torch.Tensor, name: str, out: torch.Tensor) -> None:
    """Decode all blocks of ``raw`` into ``out`` with one kernel launch.

    Args:
        raw: the stored bytes, contiguous uint8 holding whole blocks (any shape).
        name: the GGML type name, a key of ``KERNELS``.
        out: contiguous float32 / float16 / bfloat16 tensor with one value per decoded value.
    """
    kernel, block, _ = KERNELS[name]
    bpp = blocks_per_program(name, raw.device)
    n_blocks = out.numel() // block
    if out.numel() % block or raw.numel() != n_blocks * GGML_TYPES[name].type_size:  # never read past
        raise ValueError(f"{name}: {raw.numel()} stored bytes do not hold {out.numel()} values")
    dst = out.view(torch.int16) if out.dtype == torch.bfloat16 else out
    grid = (triton.cdiv(n_blocks, bpp),)
    if raw.device.type == "cuda":
        with torch.cuda.device(raw.device):
            kernel[grid](raw, dst, n_blocks, BPP=bpp, OUT=OUT_KIND[out.dtype])
    else:  # the CPU interpreter (TRITON_INTERPRET=1)
        kernel[grid](raw, dst, n_blocks, BPP=bpp, OUT=OUT_KIND[out.dtype])
