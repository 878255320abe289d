"""Figures the nodes can show: where the bytes live, copy bandwidth and stall time per step."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass


@dataclass
class Telemetry:
    """A snapshot of the manager's figures (bytes are exact; times come from CUDA events).

    Attributes:
        fixed_bytes: non-block parameters and buffers kept on the device.
        resident_bytes: blocks kept on the device.
        streamed_bytes: blocks paged in from host memory each step.
        ring_bytes: device staging buffers.
        pinned_bytes: page-locked host bytes of this model in use (streamed blocks and staging).
        pageable_bytes: streamed bytes copied from ordinary memory or a mapped file's page cache
            (pinned limit reached, pinning refused or off).
        sourced_bytes: streamed bytes read from the weight source (the file) each time they are used.
        staging_bytes: host staging buffers for those reads.
        reused_pinned_bytes: pinned bytes reused from the last detach(keep_pinned=True) (no re-pin).
        kept_pinned_bytes: while detached, page-locked bytes kept for the next attach.
        resident_pinned_bytes: page-locked host copies of the weights placed whole (resident blocks
            and non-block parameters, `StreamingConfig.pin_resident`) at the last attach.
        resident_reused_pinned_bytes: the part of those kept from the last detach (nothing copied).
        pin_seconds: time the last attach spent filling the streamed blocks' host side.
        pin_rate: bytes newly page-locked and filled per second at the last attach.
        resident_blocks, streamed_blocks: block counts.
        budget: the byte budget the plan was made for.
        oom_retries: how often attaching ran out of device memory and retried with a lower budget.
        attach_seconds: wall time of the last attach.
        steps: forward passes of the model seen since attach.
        copies, copied_bytes, copy_seconds: host-to-device copies timed so far (events read back).
        copy_bandwidth: copied_bytes / copy_seconds in bytes per second (0 before any timed copy).
        last_step_stall_s: time the compute stream waited for copies in the last complete step.
        mean_step_stall_s: the same, averaged over the complete steps timed so far.
    """

    fixed_bytes: int = 0
    resident_bytes: int = 0
    streamed_bytes: int = 0
    ring_bytes: int = 0
    pinned_bytes: int = 0
    pageable_bytes: int = 0
    sourced_bytes: int = 0
    staging_bytes: int = 0
    reused_pinned_bytes: int = 0
    kept_pinned_bytes: int = 0
    resident_pinned_bytes: int = 0
    resident_reused_pinned_bytes: int = 0
    pin_seconds: float = 0.0
    pin_rate: float = 0.0
    resident_blocks: int = 0
    streamed_blocks: int = 0
    budget: int = 0
    oom_retries: int = 0
    attach_seconds: float = 0.0
    steps: int = 0
    copies: int = 0
    copied_bytes: int = 0
    copy_seconds: float = 0.0
    copy_bandwidth: float = 0.0
    last_step_stall_s: float = 0.0
    mean_step_stall_s: float = 0.0

    def summary(self) -> str:
        """One line for logs and UIs, e.g. '17 resident / 39 streamed blocks, 41.1 GiB streamed ...'."""
        gib = 1024**3
        text = (
            f"{self.resident_blocks} resident / {self.streamed_blocks} streamed blocks, "
            f"{(self.fixed_bytes + self.resident_bytes) / gib:.1f} GiB kept on the GPU, "
            f"{self.streamed_bytes / gib:.1f} GiB streamed ({self.pinned_bytes / gib:.1f} GiB pinned"
        )
        if self.pageable_bytes:
            text += f", {self.pageable_bytes / gib:.1f} GiB pageable: slower"
        if self.sourced_bytes:
            text += f", {self.sourced_bytes / gib:.1f} GiB read from the file each step: slowest"
        text += ")"
        if self.copy_bandwidth > 0:
            text += f", copies at {self.copy_bandwidth / 1e9:.1f} GB/s"
        if self.mean_step_stall_s > 0:
            text += f", compute waited {self.mean_step_stall_s:.3f} s per step for copies"
        return text


class EventLog:
    """Timing events waiting to be read, read back only once they have completed (never blocks)."""

    def __init__(self, ops) -> None:
        self.ops = ops
        self._copies: deque = deque()  # (start, end, nbytes)
        self._stalls: deque = deque()  # (start, end, step)
        self.copies = 0
        self.copied_bytes = 0
        self.copy_ms = 0.0
        self.stall_ms: dict[int, float] = {}

    def copy(self, start, end, nbytes: int) -> None:
        self._copies.append((start, end, nbytes))

    def stall(self, start, end, step: int) -> None:
        self._stalls.append((start, end, step))

    def harvest(self, wait: bool = False) -> None:
        """Read the events that have completed (all of them, after a synchronisation, if `wait`)."""
        if wait:
            self.ops.synchronize()
        while self._copies and self._copies[0][1].query():
            start, end, nbytes = self._copies.popleft()
            self.copies += 1
            self.copied_bytes += nbytes
            self.copy_ms += start.elapsed_time(end)
            self.ops.recycle(start, end)
        while self._stalls and self._stalls[0][1].query():
            start, end, step = self._stalls.popleft()
            self.stall_ms[step] = self.stall_ms.get(step, 0.0) + start.elapsed_time(end)
            self.ops.recycle(start, end)

    def pending_steps(self) -> set[int]:
        return {s for _, _, s in self._stalls}

    def clear(self) -> None:
        self._copies.clear()
        self._stalls.clear()
