"""``apply_loras``: a stack of LoRAs applied to a FLUX.2 transformer, on the fly or merged.

On the fly (default): a forward hook beside each targeted layer adds s x B (A x) to the layer's output
(row slices for q/k/v of a fused qkv). The hook only reads the layer's input and output, so it works
beside any layer class (nn.Linear, FP8 and other quantized linears) and beside a weight streamer, which
pages the layers' own parameters: the LoRA factors are plain attributes of the hook, never parameters
or buffers of the transformer, so the streamer's plan and pinned memory never change when a LoRA or a
strength does. The factors move to the compute device on the first forward there (all LoRAs of a layer
concatenated: one (sum of ranks, in) down matrix, one up matrix per output row range, strengths folded
in), and stay there until the stack changes or ``release_device_copies``.

Per token a rank-r update costs 2 r (in + out) FLOPs beside the layer's 2 in out (rank 32: under 1% of
a [dev] block linear), but also one more read of the input and a read + write of the output (the
up-projection adds into the output inside its GEMM, beta = 1): memory traffic that a compute-bound
layer does not hide, a few percent of a resident step on GPUs with many FLOPs per byte.

Merged (``merge=True``): W <- W + delta W, computed in fp32 and rounded once, for layers whose weights
are plain float tensors (quantized layers keep the hook). Zero per-step cost, but: it needs the
weights resident and writable (not while a weight streamer is attached: its pinned copies and ring
would hold the unmerged weights), it keeps a host copy of every merged weight so that removing the
LoRA restores the base bit for bit, and a strength change rewrites the weights. The merged output
differs from the on-the-fly output by the rounding of W + delta W to the weight dtype (bf16: ~2^-8
relative per weight).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..config import PRESETS
from ..errors import CheckpointError
from .factors import Delta, Kron, LowRank, kron_apply
from .keys import block_kind_index
from .loader import Flux2LoRA

logger = logging.getLogger(__name__)

_STATE = "_flux2_lora_state"
_LIST = 8
_MERGEABLE = (torch.float32, torch.bfloat16, torch.float16)

LoRAStack = Sequence[tuple[Flux2LoRA, float]]


# --------------------------------------------------------------------------- fitting checks
def _width_label(hidden: int, flux1: bool = True) -> str:
    """The FLUX.2 sizes of a width, e.g. "FLUX.2 klein-4b / klein-base-4b (width 3072)"."""
    names = sorted({p.variant for p in PRESETS.values() if p.hidden_size == hidden})
    if not names:
        return f"a model of width {hidden}"
    flux1 = " (or FLUX.1)" if flux1 and hidden == 3072 else ""
    return f"FLUX.2 {' / '.join(names)} (width {hidden}){flux1}"


def _model_label(transformer: nn.Module) -> str:
    cfg = getattr(transformer, "config", None)
    if cfg is None:
        return type(transformer).__name__
    return (
        f"FLUX.2 {cfg.variant} model (width {cfg.hidden_size}, {cfg.depth} double + "
        f"{cfg.depth_single} single blocks)"
    )


def _rows(delta: Delta) -> tuple[int, int]:
    n = delta.out_features
    if delta.slot.start is not None:
        return delta.slot.start, delta.slot.start + n
    return delta.slot.part * n, (delta.slot.part + 1) * n


def _fits(delta: Delta, in_features: int, out_features: int) -> bool:
    if delta.in_features != in_features:
        return False
    if delta.slot.start is not None:
        return 0 <= delta.slot.start and delta.slot.start + delta.out_features <= out_features
    return delta.out_features * delta.slot.parts == out_features


def check_lora_fits(transformer: nn.Module, lora: Flux2LoRA) -> None:
    """Raise a CheckpointError naming the LoRA file when it was made for another model.

    Args:
        transformer: the FLUX.2 transformer (BFL module names).
        lora: a loaded LoRA.

    Raises:
        CheckpointError: another FLUX.2 size (or FLUX.1), blocks the model lacks, or shapes that differ.
    """
    cfg = getattr(transformer, "config", None)
    hidden = getattr(cfg, "hidden_size", None)
    fix = f"pick a LoRA trained for this model ({_width_label(hidden, flux1=False) if hidden else 'FLUX.2'})."
    if lora.hidden_size and hidden and lora.hidden_size != hidden:
        raise CheckpointError(
            lora.path,
            f"this LoRA was made for {_width_label(lora.hidden_size)}, but the model is a "
            f"{_model_label(transformer)}.",
            fix,
        )
    problems: list[str] = []
    for name, deltas in lora.layers.items():
        try:
            layer = transformer.get_submodule(name)
        except AttributeError:
            where = block_kind_index(name)
            if where and cfg is not None:
                kind, i = where
                have = cfg.depth if kind == "double_blocks" else cfg.depth_single
                problems.append(f"{name}: the model has {have} {kind.replace('_', ' ')}")
            else:
                problems.append(f"{name}: the model has no such layer")
            continue
        out_f, in_f = getattr(layer, "out_features", None), getattr(layer, "in_features", None)
        if out_f is None or in_f is None:
            problems.append(f"{name}: not a linear layer")
            continue
        for d in deltas:
            if not _fits(d, in_f, out_f):
                part = f" (part {d.slot.part + 1} of {d.slot.parts})" if d.slot.parts > 1 else ""
                if d.slot.start is not None:
                    part = f" (rows {d.slot.start} to {d.slot.start + d.out_features})"
                problems.append(
                    f"{name}{part}: LoRA {d.out_features}x{d.in_features}, layer {out_f}x{in_f}"
                    + (f" ({out_f // d.slot.parts} rows a part)" if d.slot.parts > 1 else "")
                )
    if problems:
        listed = "; ".join(problems[:_LIST]) + (
            f"; and {len(problems) - _LIST} more" if len(problems) > _LIST else ""
        )
        raise CheckpointError(
            lora.path,
            f"{len(problems)} of its {len(lora.layers)} layers do not fit this {_model_label(transformer)}: "
            f"{listed}. It was made for another model (another FLUX.2 variant, or FLUX.1).",
            fix,
        )


# --------------------------------------------------------------------------- on the fly
@dataclass
class _Segment:
    """Output rows [start, stop) get up @ h[..., cols]."""

    start: int
    stop: int
    up: torch.Tensor  # (stop - start, ranks of the covering updates), strengths folded in
    cols: slice | torch.Tensor | None  # None = every column of h


@dataclass
class _KronOnDevice:
    start: int
    stop: int
    w1: torch.Tensor  # coefficient folded in
    w2: torch.Tensor | None
    w2_a: torch.Tensor | None
    w2_b: torch.Tensor | None
    swap: bool


@dataclass
class _OnDevice:
    device: torch.device
    dtype: torch.dtype
    down: torch.Tensor | None  # (R, in)
    segments: list[_Segment]
    krons: list[_KronOnDevice]


class _LayerPatch:
    """The forward hook of one layer: base output + every LoRA update of that layer.

    Args:
        name: the layer's module path (for messages).
        out_features: the layer's output width.
        terms: (update, coefficient = strength x scale) pairs.
    """

    def __init__(self, name: str, out_features: int, terms: list[tuple[Delta, float]]):
        self.name = name
        self.out_features = out_features
        self.terms = terms
        self.on_device: _OnDevice | None = None

    def _prepare(self, device: torch.device, dtype: torch.dtype) -> _OnDevice:
        def put(t: torch.Tensor, coeff: float = 1.0) -> torch.Tensor:
            t = t.to(device=device, dtype=torch.float32)
            return (t * coeff if coeff != 1.0 else t).to(dtype)

        low = [(d, c) for d, c in self.terms if isinstance(d, LowRank)]
        down = torch.cat([put(d.down) for d, _ in low]) if low else None
        cols, at = [], 0
        for d, _ in low:
            cols.append((at, at + d.rank))
            at += d.rank
        rows = [_rows(d) for d, _ in low]
        bounds = sorted({b for r in rows for b in r})
        segments = []
        for start, stop in zip(bounds, bounds[1:]):
            cover = [i for i, (r0, r1) in enumerate(rows) if r0 <= start and stop <= r1]
            if not cover:
                continue
            up = torch.cat(
                [put(low[i][0].up[start - rows[i][0] : stop - rows[i][0]], low[i][1]) for i in cover], dim=1
            )
            idx = [c for i in cover for c in range(*cols[i])]
            if idx == list(range(at)):
                sel = None
            elif idx == list(range(idx[0], idx[-1] + 1)):
                sel = slice(idx[0], idx[-1] + 1)
            else:
                sel = torch.tensor(idx, device=device)
            segments.append(_Segment(start, stop, up, sel))
        krons = []
        for d, c in self.terms:
            if isinstance(d, Kron):
                r0, r1 = _rows(d)
                krons.append(
                    _KronOnDevice(
                        r0,
                        r1,
                        put(d.w1, c),
                        None if d.w2 is None else put(d.w2),
                        None if d.w2_a is None else put(d.w2_a),
                        None if d.w2_b is None else put(d.w2_b),
                        d.swap,
                    )
                )
        return _OnDevice(device, dtype, down, segments, krons)

    def __call__(self, module: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
        x = args[0]  # FLUX.2's linears are called with the input as the only positional argument
        dev = self.on_device
        if dev is None or dev.device != x.device or dev.dtype != x.dtype:
            # Normal tensors even under inference_mode, so later runs outside it can use them.
            with torch.inference_mode(False), torch.no_grad():
                dev = self.on_device = self._prepare(x.device, x.dtype)
        same = out.dtype == x.dtype
        if dev.down is not None:
            h = F.linear(x, dev.down)  # (..., R)
            for seg in dev.segments:
                hs = (
                    h
                    if seg.cols is None
                    else h[..., seg.cols]
                    if isinstance(seg.cols, slice)
                    else h.index_select(-1, seg.cols)
                )
                if same and out.is_contiguous():
                    # The add inside the GEMM (beta = 1): the output rows are read and written once,
                    # no temporary; a row range is a strided view the GEMM writes in place.
                    rows = out.view(-1, out.shape[-1])[:, seg.start : seg.stop]
                    rows.addmm_(hs.reshape(-1, hs.shape[-1]), seg.up.t())
                else:
                    out[..., seg.start : seg.stop].add_(F.linear(hs, seg.up).to(out.dtype))
        for k in dev.krons:
            d = kron_apply(x, k.w1, k.w2, k.w2_a, k.w2_b)
            if k.swap:
                d = d.roll(d.shape[-1] // 2, dims=-1)  # (scale, shift) -> (shift, scale)
            out[..., k.start : k.stop].add_(d.to(out.dtype))
        return out


# --------------------------------------------------------------------------- state
@dataclass(eq=False)
class _Applied:
    stack: tuple[tuple[Flux2LoRA, float], ...]
    merge: bool
    handles: list = field(default_factory=list)
    patches: dict[str, _LayerPatch] = field(default_factory=dict)
    backups: dict[str, torch.Tensor] = field(default_factory=dict)  # merged layer -> original weight (CPU)


def _state(transformer: nn.Module) -> _Applied | None:
    return transformer.__dict__.get(_STATE)


def applied_loras(transformer: nn.Module) -> tuple[tuple[Flux2LoRA, float], ...]:
    """The stack applied now (empty when none)."""
    st = _state(transformer)
    return st.stack if st is not None else ()


def release_device_copies(transformer: nn.Module) -> None:
    """Drop the LoRA factors' device copies (e.g. when the model leaves the GPU); rebuilt on next use."""
    st = _state(transformer)
    if st is not None:
        for p in st.patches.values():
            p.on_device = None


def _remove(transformer: nn.Module) -> None:
    st = transformer.__dict__.pop(_STATE, None)
    if st is None:
        return
    for h in st.handles:
        h.remove()
    with torch.no_grad():
        for name, original in st.backups.items():
            transformer.get_submodule(name).weight.copy_(original)


def _mergeable(layer: nn.Module) -> bool:
    w = getattr(layer, "weight", None)
    return (
        isinstance(w, torch.Tensor)
        and w.dim() == 2
        and w.dtype in _MERGEABLE
        and w.device.type != "meta"
        and not hasattr(layer, "dequantized")  # quantized layers: the stored bytes are not W
    )


def _merge(layer: nn.Module, terms: list[tuple[Delta, float]]) -> torch.Tensor:
    """W <- round(W + sum of coefficient x product) in fp32, in place; returns a host copy of the old W."""
    w = layer.weight
    backup = w.detach().to("cpu", copy=True)
    total = w.detach().float()
    for d, c in terms:
        r0, r1 = _rows(d)
        total[r0:r1].add_(d.product(w.device), alpha=c)
    w.copy_(total.to(w.dtype))
    return backup


def _same(stack: tuple, st: _Applied | None, merge: bool) -> bool:
    if st is None:
        return not stack
    return (
        st.merge == merge
        and len(st.stack) == len(stack)
        and all(a is c and b == d for (a, b), (c, d) in zip(st.stack, stack))
    )


def apply_loras(transformer: nn.Module, loras: LoRAStack, *, merge: bool = False) -> None:
    """Apply a stack of LoRAs in place, replacing whatever stack was applied before.

    ``apply_loras(t, [])`` removes every LoRA: the forward is the base model's again, bit for bit
    (hooks removed, merged weights restored from their host copies). Applying the stack that is
    already applied (same objects, strengths and mode) does nothing, so the factors stay on the GPU.
    A strength of 0 leaves its LoRA out.

    Args:
        transformer: a FLUX.2 transformer (BFL module names), resident, streamed or quantized.
        loras: (LoRA, strength) pairs; strengths multiply each LoRA's alpha / rank scale.
        merge: add the updates into plain float weights instead of hooking them (see the module
            docstring for the trade-off); quantized layers always use the hook.

    Raises:
        CheckpointError: a LoRA does not fit the model (checked before anything changes).
    """
    stack = tuple((lora, float(s)) for lora, s in loras)
    if _same(stack, _state(transformer), merge):
        return
    for lora, _ in stack:
        check_lora_fits(transformer, lora)
    _remove(transformer)
    terms: dict[str, list[tuple[Delta, float]]] = {}
    for lora, s in stack:
        if s == 0:
            continue
        for name, deltas in lora.layers.items():
            terms.setdefault(name, []).extend((d, s * d.scale) for d in deltas)
    if not stack:
        return
    st = _Applied(stack, merge)
    with torch.no_grad():
        for name, t in terms.items():
            layer = transformer.get_submodule(name)
            if merge and _mergeable(layer):
                st.backups[name] = _merge(layer, t)
                continue
            patch = _LayerPatch(name, layer.out_features, t)
            st.patches[name] = patch
            st.handles.append(layer.register_forward_hook(patch))
    transformer.__dict__[_STATE] = st
    logger.info(
        "LoRAs applied: %s; %d layers hooked, %d merged",
        ", ".join(f"{lora.name} x{s:g}" for lora, s in stack),
        len(st.patches),
        len(st.backups),
    )
