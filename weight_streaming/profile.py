"""Measurements the planner can use: link bandwidth and per-block compute time."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import torch
from torch import nn

from .blocks import find_blocks


def measure_link_bandwidth(device: torch.device, nbytes: int = 256 << 20) -> float | None:
    """Pinned host-to-device copy bandwidth in bytes per second (a few tens of ms); None off CUDA."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    src = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    dst = torch.empty(nbytes, dtype=torch.uint8, device=device)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    dst.copy_(src, non_blocking=True)  # warm-up
    start.record()
    for _ in range(3):
        dst.copy_(src, non_blocking=True)
    end.record()
    end.synchronize()
    return 3 * nbytes / (start.elapsed_time(end) / 1e3)


def measure_block_seconds(
    model: nn.Module, run: Callable[[], object], blocks: Sequence[str] | None = None
) -> tuple[float, ...]:
    """Compute seconds of each block in one call of `run()` (events on CUDA, wall clock on CPU).

    Use it on a resident model (or one whose blocks are all resident) to feed
    `StreamingConfig.block_seconds`; repeated blocks (called twice) add up.
    """
    named = find_blocks(model, blocks)
    cuda = next(model.parameters()).device.type == "cuda"
    marks: list[list] = [[] for _ in named]
    hooks = []
    for i, (_name, block) in enumerate(named):

        def pre(_m, _a, i=i):
            if cuda:
                e = torch.cuda.Event(enable_timing=True)
                e.record()
                marks[i].append(e)
            else:
                marks[i].append(time.perf_counter())

        def post(_m, _a, _o, i=i):
            pre(_m, _a, i)

        hooks += [block.register_forward_pre_hook(pre), block.register_forward_hook(post)]
    try:
        run()
        if cuda:
            torch.cuda.synchronize()
    finally:
        for h in hooks:
            h.remove()
    out = []
    for m in marks:
        pairs = zip(m[0::2], m[1::2])
        out.append(sum(a.elapsed_time(b) / 1e3 if cuda else b - a for a, b in pairs))
    return tuple(out)
