"""Per-block compute time without a resident model: FLOPs divided by a probed matmul rate.

`StreamingConfig.block_seconds` lets the planner compare plans by modelled step time, but measuring it
needs every block on the device once, which a 12 GB card cannot do for a 60 GiB model. The model's
owner can count each block's FLOPs instead (shapes only); this module turns them into seconds with a
short dense-matmul probe on the device, cached per (device, dtype) so that re-attaching costs nothing.

The probe runs in the dtype each block's matmuls actually compute in (`block_matmul_dtype`): float8
blocks on a GPU with FP8 tensor cores run at the FP8 rate (about 1.8x bf16 on an H100), float8 or
packed integer weights elsewhere are dequantized and run at the activation dtype's rate.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence

import torch
from torch import nn

logger = logging.getLogger(__name__)

# (device string, dtype) -> FLOP/s measured by `measure_matmul_flops`.
_PROBE_CACHE: dict[tuple[str, torch.dtype], float] = {}

FLOAT8_DTYPES = frozenset(
    getattr(torch, name)
    for name in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz")
    if hasattr(torch, name)
)

# Fraction of the dense-matmul rate a whole transformer block reaches: its layer norms, modulation,
# RoPE and gating are memory-bound and attention runs below the matmul rate. Calibrated on FLUX.2
# [dev] at 1024^2 on an H100: 2.8e14 block FLOPs ran in 0.515-0.539 s against a 4096^3 bf16 matmul
# probe of about 790 TFLOP/s (0.66-0.69). Narrow models reach much less (a quarter-width [dev] at 512^2:
# about 0.2), where this overstates their speed. Only the ratio between compute and copy time matters
# to the planner, so a rough figure is enough; pass `block_seconds` when measured times exist.
DEFAULT_FLOPS_EFFICIENCY = 0.65


def fp8_matmul_supported(device: torch.device | str) -> bool:
    """True where float8 matmuls run on tensor cores (CUDA compute capability 8.9 or newer)."""
    device = torch.device(device)
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)


def measure_matmul_flops(
    device: torch.device | str, dtype: torch.dtype = torch.bfloat16, n: int | None = None, iters: int = 5
) -> float:
    """Dense (n, n) @ (n, n) matmul throughput of a device in FLOP/s, cached per (device, dtype).

    About 10 ms on a data-centre GPU (n = 4096 by default), a few ms on a CPU (n = 256 there). One
    untimed warm-up call creates the library handles first.

    Args:
        device: where to measure.
        dtype: the dtype the matmuls compute in (bf16 for FLUX.2; a float8 dtype probes
            ``torch._scaled_mm`` with per-tensor scales, as FP8 layers run).
        n: matrix side; None picks 4096 on CUDA and 256 elsewhere.
        iters: timed matmuls.

    Returns:
        FLOP/s (2 n^3 per matmul).
    """
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())  # "cuda" and "cuda:0" share a probe
    key = (str(device), dtype)
    if key in _PROBE_CACHE:
        return _PROBE_CACHE[key]
    cuda = device.type == "cuda"
    n = n or (4096 if cuda else 256)
    g = torch.Generator(device=device).manual_seed(0)
    if dtype in FLOAT8_DTYPES:
        # Scaled float8 matmul as FP8 layers run it: row-major A, column-major B, fp32 scales, bf16 out.
        a = torch.randn(n, n, device=device, generator=g).to(dtype)
        b = torch.randn(n, n, device=device, generator=g).to(dtype)
        one = torch.ones((), device=device)

        def mm() -> None:
            torch._scaled_mm(a, b.t(), scale_a=one, scale_b=one, out_dtype=torch.bfloat16)
    else:
        a = torch.randn(n, n, device=device, dtype=dtype, generator=g)
        b = torch.randn(n, n, device=device, dtype=dtype, generator=g)
        out = torch.empty(n, n, device=device, dtype=dtype)

        def mm() -> None:
            torch.matmul(a, b, out=out)

    mm()  # warm-up: cuBLAS handle, kernel choice
    if cuda:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            mm()
        end.record()
        end.synchronize()
        seconds = start.elapsed_time(end) / 1e3
    else:
        t0 = time.perf_counter()
        for _ in range(iters):
            mm()
        seconds = time.perf_counter() - t0
    rate = 2.0 * n**3 * iters / max(seconds, 1e-9)
    _PROBE_CACHE[key] = rate
    logger.info("matmul probe on %s (%s, n=%d): %.1f TFLOP/s", device, dtype, n, rate / 1e12)
    return rate


def clear_probe_cache() -> None:
    """Forget the probed rates (e.g. after the clocks or the device changed)."""
    _PROBE_CACHE.clear()


def estimate_block_seconds(
    block_flops: Sequence[float], flops_per_second: float, efficiency: float = DEFAULT_FLOPS_EFFICIENCY
) -> tuple[float, ...]:
    """Compute seconds per block: FLOPs / (matmul rate x efficiency).

    Args:
        block_flops: FLOPs of each block in execution order for the workload at hand.
        flops_per_second: the device's matmul rate (`measure_matmul_flops`).
        efficiency: fraction of that rate a whole block reaches, in (0, 1].

    Returns:
        Seconds of each block, for `StreamingConfig.block_seconds` or `planner.Timing`.
    """
    if flops_per_second <= 0:
        raise ValueError(f"flops_per_second must be > 0, got {flops_per_second}")
    if not 0.0 < efficiency <= 1.0:
        raise ValueError(f"efficiency must lie in (0, 1], got {efficiency}")
    if any(f < 0 for f in block_flops):
        raise ValueError("block FLOPs must be >= 0")
    rate = flops_per_second * efficiency
    return tuple(float(f) / rate for f in block_flops)


def _is_linear_like(mod: nn.Module) -> bool:
    return hasattr(mod, "in_features") and hasattr(mod, "out_features")


def block_matmul_dtype(
    block: nn.Module, device: torch.device | str, activation_dtype: torch.dtype
) -> torch.dtype:
    """The dtype a block's matmuls compute in on ``device``.

    The block's linear-like modules (those with ``in_features`` and ``out_features``) vote with their
    weight count. A module may state its own with a ``matmul_dtype`` attribute (a dtype, or a callable
    taking the device). Otherwise: float weights compute in their dtype, float8 weights in float8 where
    the device has FP8 tensor cores and in ``activation_dtype`` elsewhere (dequantized first), packed
    integer weights (GGUF and the like) in ``activation_dtype``.

    Args:
        block: one streamable block.
        device: the compute device.
        activation_dtype: what the activations are (the model's compute dtype).
    """
    device = torch.device(device)
    votes: dict[torch.dtype, int] = {}
    for mod in block.modules():
        if not _is_linear_like(mod):
            continue
        declared = getattr(mod, "matmul_dtype", None)
        weight = getattr(mod, "weight", None)
        if declared is not None:
            dt = declared(device) if callable(declared) else declared
        elif not isinstance(weight, torch.Tensor):
            dt = activation_dtype
        elif weight.dtype in FLOAT8_DTYPES:
            dt = weight.dtype if fp8_matmul_supported(device) else activation_dtype
        elif weight.dtype.is_floating_point:
            dt = weight.dtype
        else:
            dt = activation_dtype
        votes[dt] = votes.get(dt, 0) + int(mod.in_features) * int(mod.out_features)
    return max(votes, key=votes.get) if votes else activation_dtype


def estimate_blocks_seconds(
    blocks: Sequence[nn.Module],
    block_flops: Sequence[float],
    device: torch.device | str,
    activation_dtype: torch.dtype,
    efficiency: float = DEFAULT_FLOPS_EFFICIENCY,
    flops_per_second: float | None = None,
    probe: Callable[[torch.device | str, torch.dtype], float] | None = None,
) -> tuple[float, ...]:
    """Compute seconds per block, each at the probed rate of the dtype its matmuls run in.

    Args:
        blocks: the streamable blocks in execution order.
        block_flops: FLOPs of each block for the workload at hand.
        device: the compute device (probes run there, once per dtype).
        activation_dtype: the model's compute dtype.
        efficiency: fraction of the matmul rate a whole block reaches, in (0, 1].
        flops_per_second: one rate for every block (no probe), e.g. a caller's measurement.
        probe: measures a (device, dtype) rate; default `measure_matmul_flops`.

    Returns:
        Seconds of each block.
    """
    if len(blocks) != len(block_flops):
        raise ValueError(f"{len(block_flops)} FLOP counts for {len(blocks)} blocks")
    probe = probe or measure_matmul_flops
    rates: dict[torch.dtype, float] = {}
    per_block = []
    for block, flops in zip(blocks, block_flops):
        dt = block_matmul_dtype(block, device, activation_dtype)
        if dt not in rates:
            rates[dt] = flops_per_second or probe(device, dt)
        per_block.append(estimate_block_seconds((flops,), rates[dt], efficiency)[0])
    return tuple(per_block)
