"""Streaming configuration: the VRAM budget, the pinned-RAM cap and the prefetch depth."""

from __future__ import annotations

import dataclasses
import logging
import sys
from dataclasses import dataclass
from typing import Literal

import torch

from .errors import StreamingError
from .estimate import DEFAULT_FLOPS_EFFICIENCY

logger = logging.getLogger(__name__)

GiB = 1 << 30

# "No limit" for a VRAM budget: every block fits, so nothing is streamed.
UNLIMITED = sys.maxsize


@dataclass
class StreamingConfig:
    """How much of a model may live on the device and how the rest is paged in.

    Attributes:
        vram_budget: bytes the model's weights may take on the device (non-block parameters, resident
            blocks and the ring of streaming buffers together), or "auto": free device memory at attach
            time minus `activation_bytes` minus `reserve_bytes`. On a CPU device "auto" means no limit.
        activation_bytes: the caller's estimate of the activations' peak (only used by "auto").
        reserve_bytes: memory left free for everything else, e.g. ComfyUI's reserve (only used by "auto").
        pinned_cap: most bytes of page-locked host memory this model may use; None is no cap of its
            own. The process-wide limit (`set_pinned_limit`, by default like ComfyUI's: 40% of RAM on
            Windows, else the lesser of 90% of RAM and RAM - 4 GiB) applies on top. Blocks past either
            are not copied again: they stream from the memory they are in (ordinary RAM or a mapped
            file's page cache, about 7x slower to copy) or are read from the weight source each step.
        pin_memory: page-lock the streamed weights; None pins when the device is CUDA. False is
            ComfyUI's ``--disable-pinned-memory`` for this model.
        prefetch_depth: how many streamed blocks are copied ahead of the one running (>= 1).
        ring_slots: number of device buffers in the ring; None is prefetch_depth + 1 (the running block
            plus the ones in flight), the fewest that lets copies overlap compute.
        timing: record CUDA events for the copy bandwidth and stall telemetry (a few microseconds a block).
        block_seconds: optional compute seconds of each block (execution order), measured or estimated
            for the workload at hand; with it the planner compares plans by modelled step time and may
            use a deeper ring (see `planner.Timing`).
        link_bandwidth: host-to-device bytes per second for that model; None measures it at attach.
        block_flops: optional FLOPs of each block (execution order) for the workload at hand; used only
            when `block_seconds` is None: turned into seconds with a matmul probe on the device at attach
            (`estimate.measure_matmul_flops`, cached per device), so no resident run is needed.
        matmul_flops: the device's matmul FLOP/s for that estimate; None probes it.
        flops_efficiency: fraction of the matmul rate a whole block reaches (see `estimate`).
        max_oom_retries: how often a device out-of-memory while attaching lowers the budget and retries.
        oom_shrink: factor applied to the budget on each such retry.
        pin_threads: threads that page-lock and fill streamed blocks at attach; None is up to 8.
        pin_resident: also keep page-locked host copies of the weights placed on the device whole
            (resident blocks, non-block parameters) when pinning is on, as far as the limits allow
            after the streamed blocks: placing them is then one DMA copy per block, and a detach
            (keep_pinned=True) keeps them for the next attach. Their parameters point into these
            copies between attaches, so the host never holds the weights twice.
    """

    vram_budget: int | Literal["auto"] = "auto"
    activation_bytes: int = 0
    reserve_bytes: int = 0
    pinned_cap: int | None = None
    pin_memory: bool | None = None
    prefetch_depth: int = 1
    ring_slots: int | None = None
    timing: bool = True
    block_seconds: tuple[float, ...] | None = None
    link_bandwidth: float | None = None
    block_flops: tuple[float, ...] | None = None
    matmul_flops: float | None = None
    flops_efficiency: float = DEFAULT_FLOPS_EFFICIENCY
    max_oom_retries: int = 4
    oom_shrink: float = 0.85
    pin_threads: int | None = None
    pin_resident: bool = False

    def __post_init__(self) -> None:
        if self.vram_budget != "auto" and (not isinstance(self.vram_budget, int) or self.vram_budget < 0):
            raise StreamingError(
                f'vram_budget={self.vram_budget!r} is not valid: give a byte count >= 0 or "auto".'
            )
        if self.prefetch_depth < 1:
            raise StreamingError(f"prefetch_depth={self.prefetch_depth} is not valid: it must be at least 1.")
        if self.ring_slots is not None and self.ring_slots < self.prefetch_depth + 1:
            raise StreamingError(
                f"ring_slots={self.ring_slots} is too small for prefetch_depth={self.prefetch_depth}: "
                f"use at least {self.prefetch_depth + 1} (or leave it unset)."
            )
        if self.pinned_cap is not None and self.pinned_cap < 0:
            raise StreamingError(f"pinned_cap={self.pinned_cap} is not valid: give bytes >= 0 or None.")
        if not 0.0 < self.flops_efficiency <= 1.0:
            raise StreamingError(
                f"flops_efficiency={self.flops_efficiency} is not valid: it must lie in (0, 1]."
            )
        if self.block_flops is not None and any(f < 0 for f in self.block_flops):
            raise StreamingError("block_flops must all be >= 0 (FLOPs of each block in execution order).")
        if self.pin_threads is not None and self.pin_threads < 1:
            raise StreamingError(f"pin_threads={self.pin_threads} is not valid: it must be at least 1.")
        if not 0.0 < self.oom_shrink < 1.0:
            raise StreamingError(f"oom_shrink={self.oom_shrink} is not valid: it must lie in (0, 1).")

    @property
    def slots(self) -> int:
        """Number of ring buffers actually used."""
        return self.ring_slots if self.ring_slots is not None else self.prefetch_depth + 1

    @classmethod
    def from_name(cls, name: str, **overrides) -> StreamingConfig:
        """A named preset, with any field overridden by keyword.

        Presets: "auto" (fill free VRAM, prefetch 1), "min_vram" (stream every block, prefetch 1),
        "deep_prefetch" (fill free VRAM, prefetch 2: for links whose speed varies), "resident" (no limit).
        """
        if name not in PRESETS:
            raise StreamingError(
                f"unknown streaming preset {name!r}: choose one of {', '.join(sorted(PRESETS))}."
            )
        return dataclasses.replace(PRESETS[name], **overrides)

    def resolve_budget(self, device: torch.device) -> int:
        """The byte budget for this device: the fixed number, or what "auto" finds free now."""
        if self.vram_budget != "auto":
            return int(self.vram_budget)
        if device.type != "cuda":
            return UNLIMITED
        free, _total = torch.cuda.mem_get_info(device)
        budget = max(0, free - self.activation_bytes - self.reserve_bytes)
        logger.info(
            "auto VRAM budget: %.2f GiB free - %.2f GiB activations - %.2f GiB reserve = %.2f GiB",
            free / GiB,
            self.activation_bytes / GiB,
            self.reserve_bytes / GiB,
            budget / GiB,
        )
        return budget


PRESETS: dict[str, StreamingConfig] = {
    "auto": StreamingConfig(),
    "min_vram": StreamingConfig(vram_budget=0),
    "deep_prefetch": StreamingConfig(prefetch_depth=2),
    "resident": StreamingConfig(vram_budget=UNLIMITED),
}
