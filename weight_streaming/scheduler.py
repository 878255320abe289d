"""Per-block ordering of copies and compute for the streamed blocks of one attached model.

Per streamed block, in static execution order (no traced first pass):
  enter block j: take the ring slot that holds j (its copy was issued earlier), issue copies for the
      next blocks into the other free slots (ring slots - 1 ahead), make the compute stream wait for j's
      copy, point j's parameters at views of the slot;
  leave block j (also on an exception): point j's parameters back at the host buffer and record on the
      compute stream that the slot's last reader is queued.
The copies after the last streamed block wrap around to the first ones, so the next forward pass (and
the first one, primed at attach) starts without waiting. Weights are never copied back to the host.
Blocks run out of order (skipped, repeated, or after a cancel) are still correct: the queue is rebuilt
from the block actually entered, at the cost of one wait.
"""

from __future__ import annotations

import logging
from collections import deque

import torch
from torch import nn

from .errors import StreamingError
from .host import BlockHost, BlockLayout
from .ring import DeviceOps, Ring, Slot
from .telemetry import EventLog

logger = logging.getLogger(__name__)


class Scheduler:
    """Owns the copy queue of one attached model; the streamer creates it after pinning.

    Args:
        ops: streams and events of the device.
        ring: the staging buffers.
        log: where timing events go.
        layouts: the streamed blocks, in execution order (position j = index in this list).
        host: each streamed block's host side (pinned buffer, pageable in place, or sourced); its
            `views` are what the block's parameters point at outside its forward.
    """

    def __init__(
        self,
        ops: DeviceOps,
        ring: Ring,
        log: EventLog,
        layouts: list[BlockLayout],
        host: list[BlockHost],
    ) -> None:
        self.ops, self.ring, self.log = ops, ring, log
        self.layouts, self.host = layouts, host
        self.queue: deque[tuple[int, Slot]] = deque()  # copies issued ahead, in the order they are needed
        self.step = 0
        self._warned_grad = False
        # Typed views of every (slot, position) pair, made once here: nothing is allocated per step, and
        # views made here are ordinary tensors even if the forward runs under inference_mode.
        for slot in ring.slots:
            for j, lay in enumerate(layouts):
                slot.views[j] = lay.views(slot.buf)

    # ------------------------------------------------------------------ installation
    def wrap_all(self) -> None:
        for j, lay in enumerate(self.layouts):
            self._wrap(lay.module, j)

    def unwrap_all(self) -> None:
        for lay in self.layouts:
            lay.module.__dict__.pop("forward", None)

    def _wrap(self, module: nn.Module, j: int) -> None:
        inner = module.forward

        def forward(*args, **kwargs):
            slot = self.enter(j)
            try:
                return inner(*args, **kwargs)
            finally:
                self.leave(j, slot)

        # An instance attribute shadows the class's forward; unwrap_all removes it again.
        module.forward = forward

    # ------------------------------------------------------------------ queue
    def on_step(self, step: int) -> None:
        """Called at the start of each forward pass of the model."""
        self.step = step
        self.log.harvest()
        self.prime()

    def prime(self) -> None:
        """Make sure the copies for the first streamed blocks are issued (at attach, after a cancel)."""
        if not self.queue or self.queue[0][0] != 0:
            self.queue.clear()
            self._topup(0)

    def _targets(self, start: int) -> list[int]:
        # Every slot but the running block's holds a block in flight: a planner-chosen deeper ring
        # deepens the prefetch with it.
        m = len(self.layouts)
        return [(start + k) % m for k in range(min(len(self.ring.slots) - 1, m))]

    def _topup(self, start: int, skip: int | None = None) -> None:
        queued = {s.index for _, s in self.queue}
        qpos = {p for p, _ in self.queue}
        for t in self._targets(start):
            if t in qpos or t == skip:
                continue
            slot = self.ring.find_holding(t, queued) or self.ring.free_slot(queued)
            if slot is None:
                break
            if slot.holds != t:
                self._issue_copy(t, slot)
            self.queue.append((t, slot))
            queued.add(slot.index)
            qpos.add(t)

    def _issue_copy(self, j: int, slot: Slot) -> None:
        ops, host = self.ops, self.host[j]
        # SYNC (write-after-read): the copy stream waits until the compute stream has finished the last
        # block that read this slot; without it the copy could overwrite weights a queued kernel reads.
        ops.copy_stream.wait_event(slot.compute_done)
        with ops.on_copy_stream():
            start = ops.event(timing=True)
            if ops.timing:
                start.record(ops.copy_stream)
            n = host.copy_to(slot.buf, slot.views[j])
            if ops.timing:
                end = ops.event(timing=True)
                end.record(ops.copy_stream)
                self.log.copy(start, end, n)
            # Producer side of the read-after-write sync in enter().
            slot.copy_done.record(ops.copy_stream)
        slot.holds = j

    def _take(self, j: int) -> Slot:
        """The slot holding (or receiving) block j; issues the copy now if none was issued ahead."""
        while self.queue:
            pos, slot = self.queue[0]
            if pos == j:
                self.queue.popleft()
                return slot
            if all(p != j for p, _ in self.queue):
                break
            self.queue.popleft()  # a block was skipped: its slot is simply free again
        # Out of order (first block after a cancel, or blocks skipped): start over from j.
        self.queue.clear()
        slot = self.ring.find_holding(j, set()) or self.ring.free_slot(set())
        if slot is None:
            raise StreamingError("no free ring slot: streamed blocks are nested inside each other.")
        if slot.holds != j:
            self._issue_copy(j, slot)
        return slot

    # ------------------------------------------------------------------ per block
    def enter(self, j: int) -> Slot:
        if not self._warned_grad and torch.is_grad_enabled():
            self._warned_grad = True
            logger.warning(
                "streamed forward with autograd on: run under torch.no_grad(); gradients through "
                "streamed weights would be wrong."
            )
        ops = self.ops
        slot = self._take(j)
        slot.busy = True
        try:
            self.ring.touch(slot)
            self._topup((j + 1) % len(self.layouts), skip=j)
            compute = ops.compute_stream()
            if ops.timing:
                t0 = ops.event(timing=True)
                t0.record(compute)
            # SYNC (read-after-write): the compute stream waits for the copy into this slot; without it
            # the block's kernels could read a half-copied weight. A GPU-side wait: the host does not block.
            compute.wait_event(slot.copy_done)
            if ops.timing:
                t1 = ops.event(timing=True)
                t1.record(compute)
                self.log.stall(t0, t1, self.step)
        except BaseException:
            slot.busy = False
            raise
        for s, v in zip(self.layouts[j].params, slot.views[j]):
            s.param.data = v
        return slot

    def leave(self, j: int, slot: Slot) -> None:
        for s, v in zip(self.layouts[j].params, self.host[j].views):
            s.param.data = v
        # SYNC (write-after-read), consumer in _issue_copy: marks the point in the compute stream after
        # which no queued kernel reads this slot any more.
        slot.compute_done.record(self.ops.compute_stream())
        slot.busy = False
