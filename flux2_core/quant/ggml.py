"""GGML (GGUF) block formats: one table row per type, dequantized with plain torch ops on any device.

Every quantized GGUF tensor is a (rows, bytes per row) uint8 array; each row is ``cols / block``
independent blocks of ``type_size`` bytes. The decoders below take (n_blocks, type_size) uint8 and
return (n_blocks, block) float32 computed in the same order of float32 operations as llama.cpp's
reference (gguf-py ``gguf/quants.py``), so the result equals it bit for bit. Half-precision scales
are widened to float32 exactly (subnormal fp16 scales, common in Q4_K/Q5_K files, included).

Nibble order, as ggml stores it: within a group of 32 values, the low nibbles of 16 bytes hold the
first 16 values and the high nibbles the next 16 (Q4_0, Q4_1, Q5_x, IQ4_NL); K-quants repeat that
per 64 values (32 bytes: low nibbles = first 32, high = next 32).

Only bit operations on uint8, integer widening and float32 multiply/add are used: no ``.item()``,
no host round trip, no data-dependent branching, so the decoders run unchanged under
``torch.compile`` and on the GPU (ops are the same as on the CPU).

These torch decoders are the reference and the fallback; on CUDA ``ggml_triton.py``'s one-pass kernels
decode the common types (see ``decoder_for`` below for what runs where).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch

logger = logging.getLogger(__name__)

QK_K = 256  # super-block size of the K-quants

# IQ4_NL / IQ4_XS non-linear 4-bit code book (ggml ``kvalues_iq4nl``).
_IQ4_VALUES = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)
_LUTS: dict[tuple[str, torch.device], torch.Tensor] = {}


def _lut(name: str, values: tuple[float, ...], device: torch.device) -> torch.Tensor:
    """A small float32 code book, made once per device (never copied from the host per call)."""
    key = (name, device)
    if key not in _LUTS:
        _LUTS[key] = torch.tensor(values, dtype=torch.float32, device=device)
    return _LUTS[key]


def _f16(b: torch.Tensor) -> torch.Tensor:
    """(n, 2k) uint8 little-endian halves -> (n, k) float32 (exact, subnormals kept)."""
    return b.contiguous().view(torch.float16).float()


def _u16(b: torch.Tensor) -> torch.Tensor:
    """(n, 2) uint8 -> (n, 1) int32 little-endian uint16."""
    b = b.to(torch.int32)
    return b[:, 0:1] | (b[:, 1:2] << 8)


def _nibbles(q: torch.Tensor, group: int) -> torch.Tensor:
    """(n, g * group) bytes -> (n, g, 2 * group) nibbles: low nibbles first, then high ones."""
    q = q.reshape(q.shape[0], -1, group)
    return torch.stack((q & 0x0F, q >> 4), dim=2).reshape(q.shape[0], -1, 2 * group)


def _bits(q: torch.Tensor, count: int, width: int) -> torch.Tensor:
    """(n, b) bytes -> (n, count, b) fields of ``width`` bits, field i at bit ``i * width``."""
    mask = (1 << width) - 1
    return torch.stack([(q >> (i * width)) & mask for i in range(count)], dim=1)


# ------------------------------------------------------------------------------ legacy 32-blocks
def _q8_0(b: torch.Tensor) -> torch.Tensor:  # d f16 | 32 x int8
    d = _f16(b[:, :2])
    return b[:, 2:].view(torch.int8).float() * d


def _q4_0(b: torch.Tensor) -> torch.Tensor:  # d f16 | 16 bytes of nibbles (q - 8)
    d = _f16(b[:, :2])
    q = _nibbles(b[:, 2:], 16).reshape(b.shape[0], 32).to(torch.int8) - 8
    return d * q.float()


def _q4_1(b: torch.Tensor) -> torch.Tensor:  # d f16 | m f16 | 16 bytes of nibbles
    d, m = _f16(b[:, :2]), _f16(b[:, 2:4])
    q = _nibbles(b[:, 4:], 16).reshape(b.shape[0], 32).float()
    return d * q + m


def _q5_high(qh: torch.Tensor) -> torch.Tensor:
    """4 bytes = one little-endian uint32 whose bit j is the 5th bit of value j -> (n, 32) uint8."""
    return _bits(qh, 8, 1).transpose(1, 2).reshape(qh.shape[0], 32)


def _q5_0(b: torch.Tensor) -> torch.Tensor:  # d f16 | qh u32 | 16 bytes of nibbles (q - 16)
    d = _f16(b[:, :2])
    q = _nibbles(b[:, 6:], 16).reshape(b.shape[0], 32) | (_q5_high(b[:, 2:6]) << 4)
    return d * (q.to(torch.int8) - 16).float()


def _q5_1(b: torch.Tensor) -> torch.Tensor:  # d f16 | m f16 | qh u32 | 16 bytes of nibbles
    d, m = _f16(b[:, :2]), _f16(b[:, 2:4])
    q = _nibbles(b[:, 8:], 16).reshape(b.shape[0], 32) | (_q5_high(b[:, 4:8]) << 4)
    return d * q.float() + m


def _iq4_nl(b: torch.Tensor) -> torch.Tensor:  # d f16 | 16 bytes of code-book nibbles
    d = _f16(b[:, :2])
    idx = _nibbles(b[:, 2:], 16).reshape(b.shape[0], 32).long()
    return d * _lut("iq4", _IQ4_VALUES, b.device)[idx]


# ----------------------------------------------------------------------------- K-quants (256)
def _k_scale_min(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K/Q5_K 12-byte packing of 8 six-bit scales and 8 six-bit mins -> two (n, 8) uint8."""
    d, m, md = s[:, 0:4], s[:, 4:8], s[:, 8:12]
    sc = torch.cat((d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)), dim=1)
    mn = torch.cat((m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)), dim=1)
    return sc, mn


def _q2_k(b: torch.Tensor) -> torch.Tensor:  # 16 scale bytes | 64 bytes of 2-bit q | d | dmin
    n = b.shape[0]
    scales, qs = b[:, :16], b[:, 16:80]
    d, dmin = _f16(b[:, 80:82]), _f16(b[:, 82:84])
    dl = (d * (scales & 0x0F).float()).reshape(n, 16, 1)
    ml = (dmin * (scales >> 4).float()).reshape(n, 16, 1)
    q = _bits(qs.reshape(n, 2, 32), 4, 2)  # (n, 4, 2, 32): shift index before the 32-byte half
    q = q.transpose(1, 2).reshape(n, 16, 16).float()
    return (dl * q - ml).reshape(n, QK_K)


def _q3_k(b: torch.Tensor) -> torch.Tensor:  # hmask 32 | 64 bytes of 2-bit q | 12 scale bytes | d
    n = b.shape[0]
    hmask, qs, s = b[:, :32], b[:, 32:96], b[:, 96:108]
    d = _f16(b[:, 108:110])
    low = torch.cat((s[:, :8] & 0x0F, s[:, :8] >> 4), dim=1)  # (n, 16)
    high = _bits(s[:, 8:12], 4, 2).reshape(n, 16)
    scales = ((low | (high << 4)).to(torch.int8) - 32).float()
    dl = (d * scales).reshape(n, 16, 1)
    ql = _bits(qs.reshape(n, 2, 32), 4, 2).transpose(1, 2).reshape(n, 16, 16)
    qh = _bits(hmask, 8, 1).reshape(n, 16, 16) ^ 1  # a set bit means "no -4 offset"
    q = (ql.to(torch.int8) - (qh << 2).to(torch.int8)).float()
    return (dl * q).reshape(n, QK_K)


def _q4_k(b: torch.Tensor) -> torch.Tensor:  # d | dmin | 12 scale bytes | 128 bytes of nibbles
    n = b.shape[0]
    d, dmin = _f16(b[:, :2]), _f16(b[:, 2:4])
    sc, mn = _k_scale_min(b[:, 4:16])
    dd = (d * sc.float()).reshape(n, 8, 1)
    dm = (dmin * mn.float()).reshape(n, 8, 1)
    q = _nibbles(b[:, 16:], 32).reshape(n, 8, 32).float()
    return (dd * q - dm).reshape(n, QK_K)


def _q5_k(b: torch.Tensor) -> torch.Tensor:  # d | dmin | 12 scale bytes | qh 32 | 128 nibble bytes
    n = b.shape[0]
    d, dmin = _f16(b[:, :2]), _f16(b[:, 2:4])
    sc, mn = _k_scale_min(b[:, 4:16])
    dd = (d * sc.float()).reshape(n, 8, 1)
    dm = (dmin * mn.float()).reshape(n, 8, 1)
    ql = _nibbles(b[:, 48:], 32).reshape(n, 8, 32)
    qh = _bits(b[:, 16:48], 8, 1)  # (n, 8, 32): bit i of byte j is the 5th bit of value 32 i + j
    q = (ql | (qh << 4)).float()
    return (dd * q - dm).reshape(n, QK_K)


def _q6_k(b: torch.Tensor) -> torch.Tensor:  # ql 128 | qh 64 | 16 int8 scales | d
    n = b.shape[0]
    ql, qh = b[:, :128], b[:, 128:192]
    scales = b[:, 192:208].view(torch.int8).float()
    d = _f16(b[:, 208:210])
    dd = (d * scales).reshape(n, 16, 1)
    low = _nibbles(ql, 64).reshape(n, 8, 32)  # (n, 2 halves, 2 nibbles, 64) -> 8 rows of 32
    high = _bits(qh.reshape(n, 2, 32), 4, 2).transpose(1, 2).reshape(n, 8, 32)
    q = ((low | (high << 4)).to(torch.int8) - 32).reshape(n, 16, 16).float()
    return (dd * q).reshape(n, QK_K)


def _iq4_xs(b: torch.Tensor) -> torch.Tensor:  # d | scales_h u16 | scales_l 4 | 128 nibble bytes
    n = b.shape[0]
    d = _f16(b[:, :2])
    sh = _u16(b[:, 2:4])  # (n, 1) int32
    sl = b[:, 4:8]
    low = torch.stack((sl & 0x0F, sl >> 4), dim=2).reshape(n, 8)
    high = torch.stack([(sh >> (2 * i)) & 3 for i in range(8)], dim=1).reshape(n, 8).to(torch.uint8)
    scales = ((low | (high << 4)).to(torch.int8) - 32).float()
    dl = (d * scales).reshape(n, 8, 1)
    idx = _nibbles(b[:, 8:], 16).reshape(n, 8, 32).long()
    return (dl * _lut("iq4", _IQ4_VALUES, b.device)[idx]).reshape(n, QK_K)


# ------------------------------------------------------------------------------- plain types
def _bf16(b: torch.Tensor) -> torch.Tensor:  # bfloat16 bits: widening is a 16-bit shift, exact
    return b.contiguous().view(torch.bfloat16).float()


def _f16_plain(b: torch.Tensor) -> torch.Tensor:
    return b.contiguous().view(torch.float16).float()


def _f32(b: torch.Tensor) -> torch.Tensor:
    return b.contiguous().view(torch.float32)


@dataclass(frozen=True)
class GGMLType:
    """One GGML storage type.

    Attributes:
        name: ggml's name ("Q4_K").
        type_id: ``GGMLQuantizationType`` value in GGUF files.
        block: values per block.
        type_size: bytes per block.
        decode: (n_blocks, type_size) uint8 -> (n_blocks, block) float32.
        quantized: False for F32/F16/BF16, which the loaders keep as ordinary tensors.
    """

    name: str
    type_id: int
    block: int
    type_size: int
    decode: Callable[[torch.Tensor], torch.Tensor]
    quantized: bool = True

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.type_size / self.block

    def row_bytes(self, cols: int) -> int:
        """Bytes of one stored row of ``cols`` values."""
        return cols // self.block * self.type_size


# The supported types (ids and block sizes as in gguf-py's GGML_QUANT_SIZES).
GGML_TYPES: dict[str, GGMLType] = {
    t.name: t
    for t in (
        GGMLType("F32", 0, 1, 4, _f32, quantized=False),
        GGMLType("F16", 1, 1, 2, _f16_plain, quantized=False),
        GGMLType("BF16", 30, 1, 2, _bf16, quantized=False),
        GGMLType("Q4_0", 2, 32, 18, _q4_0),
        GGMLType("Q4_1", 3, 32, 20, _q4_1),
        GGMLType("Q5_0", 6, 32, 22, _q5_0),
        GGMLType("Q5_1", 7, 32, 24, _q5_1),
        GGMLType("Q8_0", 8, 32, 34, _q8_0),
        GGMLType("Q2_K", 10, 256, 84, _q2_k),
        GGMLType("Q3_K", 11, 256, 110, _q3_k),
        GGMLType("Q4_K", 12, 256, 144, _q4_k),
        GGMLType("Q5_K", 13, 256, 176, _q5_k),
        GGMLType("Q6_K", 14, 256, 210, _q6_k),
        GGMLType("IQ4_NL", 20, 32, 18, _iq4_nl),
        GGMLType("IQ4_XS", 23, 256, 136, _iq4_xs),
    )
}
GGML_BY_ID: dict[int, GGMLType] = {t.type_id: t for t in GGML_TYPES.values()}

# Rows decoded at a time: bounds the float32 temporaries (a few times this many values) whatever
# the layer size, e.g. [dev]'s single-block linear1 (55296 x 6144) decodes in ~21 slices.
_CHUNK_VALUES = 16 * 1024 * 1024


# Which decoder runs, per call (``decoder_for``):
# - "triton": ``ggml_triton``'s kernels, one pass from the stored bytes to the output dtype (read the
#   bytes once, write the values once, one launch per layer). The default on CUDA where Triton is
#   importable, for the types it has kernels for (Q8_0, Q4_0/1, Q5_0/1, Q2_K..Q6_K); elsewhere, and
#   for the others (IQ4_NL, IQ4_XS), the torch decoders. Also on the CPU when asked for and
#   ``TRITON_INTERPRET=1`` (Triton's interpreter: the tests).
# - "compile": the torch decoders through torch.compile, fused into one kernel per type (opt-in:
#   costs seconds per type on the first step; the older switch FLUX2LOCAL_COMPILE_DEQUANT=1 asks too).
# - "torch": the eager decoders above (the reference): a dozen kernels with float32 temporaries, in
#   16M-value slices. FLUX2LOCAL_FAST does not change the choice: the Triton kernels give the torch
#   decoders' values bit for bit, so the eager (reference) blocks keep the fast decoding.
# A failure of a fused decoder logs one warning and falls back to "torch" for the process.
ENV_DECODER = "FLUX2LOCAL_GGUF_DECODER"
DECODERS = ("auto", "torch", "triton", "compile")
_COMPILED: dict[tuple[str, torch.dtype], Callable[[torch.Tensor], torch.Tensor]] = {}
_COMPILE_FAILED: list[str] = []
_TRITON_FAILED: list[str] = []
_TRITON_STATE: dict[str, object] = {}  # "module" once imported, "missing" with the reason if not
_LOGGED: set[str] = set()
DECODER_CALLS: dict[str, int] = {}  # decoder -> layers it decoded in this process (benchmarks, tests)


def _log_once(key: str, level: int, msg: str, *args) -> None:
    if key not in _LOGGED:
        _LOGGED.add(key)
        logger.log(level, msg, *args)


def requested_decoder() -> str:
    """The decoder asked for by the environment ("auto", "torch", "triton" or "compile")."""
    asked = os.environ.get(ENV_DECODER, "auto").strip().lower() or "auto"
    if asked not in DECODERS:
        raise ValueError(f"{ENV_DECODER}={asked!r} is not valid: choose one of {', '.join(DECODERS)}")
    if asked == "auto" and os.environ.get("FLUX2LOCAL_COMPILE_DEQUANT", "0") == "1":
        return "compile"
    return asked


def _triton_kernels():
    """The ``ggml_triton`` module, or None when Triton cannot be imported (reason logged once)."""
    if "module" not in _TRITON_STATE and "missing" not in _TRITON_STATE:
        try:
            from . import ggml_triton

            _TRITON_STATE["module"] = ggml_triton
        except Exception as e:  # noqa: BLE001 - no or a broken Triton: the torch decoders serve
            _TRITON_STATE["missing"] = f"{type(e).__name__}: {e}"
            _log_once(
                "triton-missing",
                logging.INFO,
                "GGUF Triton decoders unavailable (%s)",
                _TRITON_STATE["missing"],
            )
    return _TRITON_STATE.get("module")


def _triton_runs_on(device: torch.device) -> bool:
    if device.type == "cuda":
        return True
    return device.type == "cpu" and os.environ.get("TRITON_INTERPRET", "0") == "1"


def decoder_for(qtype: GGMLType, device: torch.device, dtype: torch.dtype) -> str:
    """The decoder that will decode ``qtype`` on ``device`` into ``dtype``: "triton", "compile" or "torch"."""
    asked = requested_decoder()
    if asked in ("auto", "triton") and not _TRITON_FAILED:
        if (asked == "triton" or device.type == "cuda") and _triton_runs_on(device):
            kernels = _triton_kernels()
            if kernels is not None and qtype.name in kernels.KERNELS and dtype in kernels.OUT_KIND:
                return "triton"
    if asked == "compile" and device.type == "cuda" and not _COMPILE_FAILED:
        return "compile"
    return "torch"


def _decode(qtype: GGMLType, blocks: torch.Tensor, dtype: torch.dtype, compiled: bool) -> torch.Tensor:
    """(n_blocks, type_size) -> (n_blocks, block) values (float32, or ``dtype`` when compiled)."""
    if not compiled or torch.compiler.is_compiling():
        return qtype.decode(blocks)
    key = (qtype.name, dtype)
    if key not in _COMPILED:
        _COMPILED[key] = torch.compile(lambda b: qtype.decode(b).to(dtype), dynamic=True, fullgraph=True)
    try:
        return _COMPILED[key](blocks)
    except Exception as e:  # noqa: BLE001 - no Triton, an unsupported GPU...: decode eagerly from now on
        _COMPILE_FAILED.append(f"{type(e).__name__}: {e}")
        logger.warning("compiled GGUF dequantization failed (%s); using eager torch ops", _COMPILE_FAILED[0])
        return qtype.decode(blocks)


def _triton_decode(raw: torch.Tensor, qtype: GGMLType, out: torch.Tensor) -> bool:
    """Decode with the Triton kernel into contiguous ``out``; False (logged once) if it failed."""
    if torch.compiler.is_compiling():  # opaque to the compiler, writes ``out`` in place
        torch.ops.flux2local.ggml_decode_(raw, qtype.name, out)
        return True
    try:
        _triton_kernels().decode_into(raw, qtype.name, out)
        return True
    except Exception as e:  # noqa: BLE001 - a compiler or driver problem: the torch decoders serve
        _TRITON_FAILED.append(f"{type(e).__name__}: {e}")
        logger.warning("GGUF Triton decoder failed (%s); using the torch decoders", _TRITON_FAILED[0])
        return False


@torch.library.custom_op("flux2local::ggml_decode_", mutates_args=("out",))
def _ggml_decode_op(raw: torch.Tensor, name: str, out: torch.Tensor) -> None:
    """The Triton decode as one opaque op, so torch.compile'd code calls the kernel as it is."""
    _triton_kernels().decode_into(raw, name, out)


@_ggml_decode_op.register_fake
def _(raw: torch.Tensor, name: str, out: torch.Tensor) -> None:
    return None


def ggml_type(name_or_id: str | int) -> GGMLType:
    """The table row of a GGML type by name ("Q4_K") or GGUF id (12). KeyError if unsupported."""
    return GGML_BY_ID[name_or_id] if isinstance(name_or_id, int) else GGML_TYPES[name_or_id]


def dequantize_ggml(
    data: torch.Tensor,
    qtype: GGMLType,
    shape: tuple[int, ...],
    dtype: torch.dtype = torch.float32,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Decode a stored GGML tensor on its own device.

    Args:
        data: the stored bytes, (rows, bytes per row) uint8 (any leading layout with that many bytes).
        qtype: its ``GGMLType``.
        shape: the logical shape (rows, cols) (or any shape whose last dim is the row length).
        dtype: output dtype; values are computed in float32 and rounded once.
        out: optional preallocated output of ``shape`` and ``dtype`` (e.g. a scratch buffer view).

    Returns:
        ``out`` (or a new tensor) holding the values.
    """
    cols = shape[-1]
    rows = 1
    for s in shape[:-1]:
        rows *= s
    raw = data.reshape(rows, qtype.row_bytes(cols))
    if out is None:
        out = torch.empty(shape, dtype=dtype, device=data.device)
    decoder = decoder_for(qtype, data.device, dtype)
    if decoder == "triton" and raw.is_contiguous() and out.is_contiguous():
        if _triton_decode(raw, qtype, out):
            _count("triton", data.device)
            return out
        decoder = "torch"
    _count(decoder, data.device)
    flat = out.view(rows, cols)
    step = max(1, _CHUNK_VALUES // max(1, cols))
    for r in range(0, rows, step):
        part = raw[r : r + step]
        n = part.shape[0]
        values = _decode(qtype, part.reshape(-1, qtype.type_size), dtype, decoder == "compile")
        flat[r : r + n].copy_(values.view(n, cols))  # (n_blocks, block) values -> n rows
    return out


def _count(decoder: str, device: torch.device) -> None:
    if torch.compiler.is_compiling():
        return
    DECODER_CALLS[decoder] = DECODER_CALLS.get(decoder, 0) + 1
    _log_once(
        f"decoder:{decoder}:{device.type}",
        logging.INFO,
        "GGUF dequantization on %s: %s decoders",
        device.type,
        {"triton": "Triton one-pass", "compile": "torch.compile'd", "torch": "torch (eager)"}[decoder],
    )
