"""Residency planning: which blocks stay on the device and which are streamed from host memory."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

from .schedule import simulate_step

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Plan:
    """The outcome of `plan_residency`.

    Attributes:
        resident: one flag per block, in execution order; True keeps the block on the device.
        block_sizes: bytes of each block (as stored, padded to the host layout's alignment).
        ring_slots: number of device staging buffers (0 when nothing is streamed).
        ring_slot_bytes: size of each staging buffer (the largest streamed block).
        fixed_bytes: bytes that are always resident (non-block parameters and buffers).
        budget: the byte budget the plan was made for.
    """

    resident: tuple[bool, ...]
    block_sizes: tuple[int, ...]
    ring_slots: int
    ring_slot_bytes: int
    fixed_bytes: int
    budget: int

    @property
    def resident_indices(self) -> list[int]:
        return [i for i, r in enumerate(self.resident) if r]

    @property
    def streamed_indices(self) -> list[int]:
        return [i for i, r in enumerate(self.resident) if not r]

    @property
    def resident_bytes(self) -> int:
        return sum(s for s, r in zip(self.block_sizes, self.resident) if r)

    @property
    def streamed_bytes(self) -> int:
        return sum(s for s, r in zip(self.block_sizes, self.resident) if not r)

    @property
    def ring_bytes(self) -> int:
        return self.ring_slots * self.ring_slot_bytes

    @property
    def device_bytes(self) -> int:
        """Weight bytes the plan puts on the device: fixed + resident blocks + ring."""
        return self.fixed_bytes + self.resident_bytes + self.ring_bytes

    @property
    def fits(self) -> bool:
        return self.device_bytes <= self.budget

    @property
    def longest_streamed_run(self) -> int:
        """Most streamed blocks that run back to back (each such pair can stall the prefetch)."""
        best = run = 0
        for r in self.resident:
            run = 0 if r else run + 1
            best = max(best, run)
        return best


def _spread(sizes: Sequence[int], eligible: Sequence[bool], avail: int) -> list[bool]:
    """Pick eligible blocks to keep, at most `avail` bytes, spread evenly over the execution order.

    Error diffusion: each block adds its share (avail / eligible bytes) of its own size to an
    accumulator, and a block is kept once the accumulator covers half of it, so kept bytes are spread
    in proportion to position. Leftover room is then filled, first with blocks that break up runs of
    streamed blocks.
    """
    n = len(sizes)
    keep = [False] * n
    pool = sum(s for s, e in zip(sizes, eligible) if e)
    if pool == 0 or avail <= 0:
        return keep
    share = min(1.0, avail / pool)
    acc = 0.0
    used = 0
    for i in range(n):
        if not eligible[i]:
            continue
        acc += share * sizes[i]
        if acc >= 0.5 * sizes[i] and used + sizes[i] <= avail:
            keep[i] = True
            used += sizes[i]
            acc -= sizes[i]

    def streamed_neighbours(i: int) -> int:
        return sum(1 for j in (i - 1, i + 1) if 0 <= j < n and not keep[j])

    rest = [i for i in range(n) if eligible[i] and not keep[i]]
    rest.sort(key=lambda i: (-streamed_neighbours(i), -sizes[i], i))
    for i in rest:
        if used + sizes[i] <= avail:
            keep[i] = True
            used += sizes[i]
    return keep


@dataclass(frozen=True)
class Timing:
    """Cost estimates that let the planner compare plans by modelled step time.

    Attributes:
        block_seconds: compute seconds of each block (e.g. measured in a resident run, or estimated).
        bytes_per_second: host-to-device copy bandwidth (pinned).
        extra_slots: besides the minimum ring, also try rings with up to this many more slots.
    """

    block_seconds: tuple[float, ...]
    bytes_per_second: float
    extra_slots: int = 2


def plan_residency(
    block_sizes: Sequence[int],
    budget: int,
    *,
    fixed_bytes: int = 0,
    ring_slots: int = 2,
    timing: Timing | None = None,
) -> Plan:
    """Decide which blocks stay on the device within a byte budget.

    The budget covers the fixed (non-block) bytes, the resident blocks and, when anything is streamed,
    `ring_slots` staging buffers the size of the largest streamed block. Among the possible ring sizes
    (one per distinct block size: blocks larger than the ring must then stay resident) the plan keeps
    the most bytes resident; ties go to the plan with the shortest run of back-to-back streamed blocks.
    With `timing`, plans (also with up to `timing.extra_slots` more ring slots) are compared by their
    modelled step time instead (`schedule.simulate_step`): a resident block placed where the copy
    engine cannot work ahead of it saves less than its bytes suggest, and a deeper ring can be worth
    more than one more resident block.
    If even streaming every block does not fit, that plan is returned anyway with `fits` False (the
    caller decides whether to go on) and a warning is logged; a budget of 0 asks for exactly that plan.

    Args:
        block_sizes: bytes of each block in execution order.
        budget: bytes available on the device for weights (see `StreamingConfig.resolve_budget`).
        fixed_bytes: bytes that stay resident whatever happens (non-block parameters).
        ring_slots: number of staging buffers used when anything is streamed (prefetch depth + 1); the
            minimum when `timing` is given.
        timing: optional cost estimates (see `Timing`).

    Returns:
        The `Plan`.
    """
    sizes = tuple(int(s) for s in block_sizes)
    if any(s < 0 for s in sizes):
        raise ValueError(f"block sizes must be >= 0, got {sizes}")
    n = len(sizes)
    cap = budget - fixed_bytes
    if sum(sizes) <= cap:
        return Plan((True,) * n, sizes, 0, 0, fixed_bytes, budget)

    if timing is not None and len(timing.block_seconds) != n:
        raise ValueError(f"timing has {len(timing.block_seconds)} block times for {n} blocks")
    best: Plan | None = None
    best_key: tuple | None = None
    slot_counts = range(ring_slots, ring_slots + 1 + (timing.extra_slots if timing else 0))
    for slots in slot_counts:
        for slot_bytes in sorted(set(sizes), reverse=True):
            forced = [s > slot_bytes for s in sizes]
            avail = cap - slots * slot_bytes - sum(s for s, f in zip(sizes, forced) if f)
            if avail < 0:
                continue
            keep = _spread(sizes, [not f for f in forced], avail)
            resident = tuple(f or k for f, k in zip(forced, keep))
            streamed = [s for s, r in zip(sizes, resident) if not r]
            if not streamed:
                continue
            plan = Plan(resident, sizes, slots, max(streamed), fixed_bytes, budget)
            key: tuple = (plan.resident_bytes, -plan.longest_streamed_run, -slots)
            if timing is not None:
                step = simulate_step(resident, sizes, timing.block_seconds, timing.bytes_per_second, slots)
                # Round to 0.1% so near-ties fall back to the byte-based order.
                key = (-round(step / sum(timing.block_seconds), 3), *key)
            if best_key is None or key > best_key:
                best, best_key = plan, key
    if best is None:
        best = Plan((False,) * n, sizes, ring_slots, max(sizes, default=0), fixed_bytes, budget)
        if budget == 0:
            return best  # 0 asks for "stream every block" (the min_vram preset): nothing to warn about
        logger.warning(
            "VRAM budget %.2f GiB is below what streaming every block needs (%.2f GiB: %.2f GiB fixed "
            "+ %d ring buffers of %.2f GiB); going on, expect an out-of-memory error.",
            budget / 2**30,
            best.device_bytes / 2**30,
            fixed_bytes / 2**30,
            ring_slots,
            best.ring_slot_bytes / 2**30,
        )
    return best
