"""The device side: a fixed ring of staging buffers, the copy stream and the events that order them.

On CUDA the copies run on a side stream and every ordering is a CUDA event (no host synchronisation in
the steady state). On a CPU device the same bookkeeping runs with plain synchronous copies and events
that do nothing, so tests can exercise the slot logic without a GPU.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch


class _NullEvent:
    """Stands in for a CUDA event on the CPU path: every copy is already complete when issued."""

    def record(self, stream=None) -> None:
        pass

    def query(self) -> bool:
        return True

    def synchronize(self) -> None:
        pass

    def elapsed_time(self, other: _NullEvent) -> float:
        return 0.0


class _NullStream:
    def wait_event(self, event) -> None:
        pass

    def synchronize(self) -> None:
        pass


class DeviceOps:
    """Streams and events for one device (CUDA), or no-op stand-ins (CPU)."""

    def __init__(self, device: torch.device, timing: bool) -> None:
        self.device = device
        self.cuda = device.type == "cuda"
        self.timing = timing and self.cuda
        # The copy stream is created once: every H2D copy goes on it, in issue order, so copies into
        # the same slot can never overtake each other.
        self.copy_stream = torch.cuda.Stream(device) if self.cuda else _NullStream()
        self._pool: list = []

    def compute_stream(self):
        return torch.cuda.current_stream(self.device) if self.cuda else _NullStream()

    def event(self, timing: bool = False):
        if not self.cuda:
            return _NullEvent()
        if timing and self.timing:
            return self._pool.pop() if self._pool else torch.cuda.Event(enable_timing=True)
        return torch.cuda.Event()

    def recycle(self, *events) -> None:
        """Return timing events whose times were read, so the steady state creates none."""
        if self.cuda:
            self._pool.extend(events)

    def on_copy_stream(self):
        return torch.cuda.stream(self.copy_stream) if self.cuda else contextlib.nullcontext()

    def synchronize(self) -> None:
        if self.cuda:
            self.copy_stream.synchronize()
            torch.cuda.synchronize(self.device)


@dataclass
class Slot:
    """One staging buffer on the device."""

    index: int
    buf: torch.Tensor  # (ring_slot_bytes,) uint8 on the device
    copy_done: object  # event recorded on the copy stream after the last copy into buf
    compute_done: object  # event recorded on the compute stream after the last block that read buf
    holds: int | None = None  # streamed position whose bytes buf holds (or is receiving)
    busy: bool = False  # a block is running on it right now
    last_used: int = 0
    views: dict[int, list[torch.Tensor]] = field(default_factory=dict)  # cached typed views per position


class Ring:
    """A fixed set of staging buffers, allocated once at attach and reused for every streamed block."""

    def __init__(self, ops: DeviceOps, buffers: list[torch.Tensor]) -> None:
        self.ops = ops
        self.slots = [Slot(i, buf, ops.event(), ops.event()) for i, buf in enumerate(buffers)]
        self._tick = 0

    @property
    def nbytes(self) -> int:
        return sum(s.buf.numel() for s in self.slots)

    def touch(self, slot: Slot) -> None:
        self._tick += 1
        slot.last_used = self._tick

    def free_slot(self, exclude: set[int]) -> Slot | None:
        """The least recently used slot that is not running a block and not in `exclude` (queued).

        Least recently used means the block that last read it is the furthest behind in the compute
        stream, so the copy into it is the least likely to wait for that block to finish.
        """
        free = [s for s in self.slots if not s.busy and s.index not in exclude]
        return min(free, key=lambda s: s.last_used) if free else None

    def find_holding(self, pos: int, exclude: set[int]) -> Slot | None:
        for s in self.slots:
            if s.holds == pos and not s.busy and s.index not in exclude:
                return s
        return None
