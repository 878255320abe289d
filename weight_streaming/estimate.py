"""Per-block compute time without a resident model: FLOPs divided by a probed matmul rate.

`StreamingConfig.block_seconds` lets the planner compare plans by modelled step time, but measuring it
needs every block on the device once, which a 12 GB card cannot do for a 60 GiB model. The model's
owner can count each block's FLOPs instead (shapes only); this module turns them into seconds with a
short dense-matmul probe on the device, cached per (device, dtype) so that re-attaching costs nothing.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

import torch

logger = logging.getLogger(__name__)

# (device string, dtype) -> FLOP/s measured by `measure_matmul_flops`.
_PROBE_CACHE: dict[tuple[str, torch.dtype], float] = {}

# Fraction of the dense-matmul rate a whole transformer block reaches: its layer norms, modulation,
# RoPE and gating are memory-bound and attention runs below the matmul rate. Calibrated on FLUX.2
# [dev] at 1024^2 on an H100: 2.8e14 block FLOPs ran in 0.515-0.539 s against a 4096^3 bf16 matmul
# probe of about 790 TFLOP/s (0.66-0.69). Narrow models reach much less (a quarter-width [dev] at 512^2:
# about 0.2), where this overstates their speed. Only the ratio between compute and copy time matters
# to the planner, so a rough figure is enough; pass `block_seconds` when measured times exist.
DEFAULT_FLOPS_EFFICIENCY = 0.65


def measure_matmul_flops(
    device: torch.device | str, dtype: torch.dtype = torch.bfloat16, n: int | None = None, iters: int = 5
) -> float:
    """Dense (n, n) @ (n, n) matmul throughput of a device in FLOP/s, cached per (device, dtype).

    About 10 ms on a data-centre GPU (n = 4096 by default), a few ms on a CPU (n = 256 there). One
    untimed warm-up call creates the library handles first.

    Args:
        device: where to measure.
        dtype: the compute dtype of the model (bf16 for FLUX.2).
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
    a = torch.randn(n, n, device=device, dtype=dtype, generator=g)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=g)
    out = torch.empty(n, n, device=device, dtype=dtype)
    torch.matmul(a, b, out=out)  # warm-up: cuBLAS handle, kernel choice
    if cuda:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            torch.matmul(a, b, out=out)
        end.record()
        end.synchronize()
        seconds = start.elapsed_time(end) / 1e3
    else:
        t0 = time.perf_counter()
        for _ in range(iters):
            torch.matmul(a, b, out=out)
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
