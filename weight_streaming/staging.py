"""Blocks with no host copy: read from the weight source (the file) each time they are needed.

This is the path for models that do not fit in the RAM that may be locked and are not memory-mapped
(e.g. ComfyUI's ``--disable-mmap``): `Stager` keeps a few staging buffers (page-locked when the limit
allows) of the largest such block. A reader thread fills the next block's buffer while the current
one is copied to the device and computed, one sourced block ahead:

    copy j:   wait for j's read -> host-to-device copy from its buffer -> event E_j on the copy stream
              -> ask the reader for the next sourced block, into the least recently used buffer
    reader:   wait for that buffer's last copy event (the device is done reading it), then read_into
"""

from __future__ import annotations

import logging
import threading
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from . import hostmem
from .host import BlockHost, BlockLayout, WeightSource
from .ring import DeviceOps

logger = logging.getLogger(__name__)


class _Staging:
    def __init__(self, data: torch.Tensor, pinned: bool) -> None:
        self.data = data
        self.pinned = pinned
        self.copied = None  # event recorded after the last device copy out of this buffer
        self.last_used = 0


class Stager:
    """Staging buffers and a one-thread reader for the sourced blocks of one attached model.

    Args:
        ops: the device's streams and events.
        source: the weight source.
        layouts: streamed position -> layout, for every sourced block.
        pin: page-lock the staging buffers (within the process limit).
        buffers: number of staging buffers (2: one being copied, one being read).
    """

    def __init__(
        self,
        ops: DeviceOps,
        source: WeightSource,
        layouts: dict[int, BlockLayout],
        pin: bool,
        buffers: int = 2,
    ) -> None:
        self.ops, self.source, self.layouts = ops, source, layouts
        self.order = sorted(layouts)
        self.nbytes = max(lay.nbytes for lay in layouts.values())
        self.buffers: list[_Staging] = []
        for _ in range(buffers):
            data = hostmem.alloc_host(self.nbytes)
            pinned = False
            if pin and hostmem.LEDGER.try_reserve(self.nbytes):
                try:
                    hostmem.register(data)
                    pinned = True
                except RuntimeError:
                    hostmem.LEDGER.release(self.nbytes)
            self.buffers.append(_Staging(data, pinned))
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="weight-stager")
        self._pending: dict[int, tuple[_Staging, Future]] = {}
        self._tick = 0
        # Reads from the main thread (out of order) and the reader thread never overlap unless the
        # source says it is thread-safe.
        self._read_lock = threading.Lock() if not getattr(source, "thread_safe", False) else None

    @property
    def staging_bytes(self) -> int:
        return self.nbytes * len(self.buffers)

    @property
    def pinned_bytes(self) -> int:
        return sum(self.nbytes for b in self.buffers if b.pinned)

    def _read(self, pos: int, buf: _Staging) -> None:
        if buf.copied is not None:
            buf.copied.synchronize()  # the device has finished copying the previous block out of it
        lay = self.layouts[pos]
        views = lay.views(buf.data)
        if self._read_lock is not None:
            with self._read_lock:
                for slot, view in zip(lay.params, views):
                    self.source.read_into(slot.name, view)
        else:
            for slot, view in zip(lay.params, views):
                self.source.read_into(slot.name, view)

    def _free_buffer(self, avoid: _Staging | None = None) -> _Staging | None:
        busy = {id(b) for b, _ in self._pending.values()}
        free = [b for b in self.buffers if id(b) not in busy and b is not avoid]
        return min(free, key=lambda b: b.last_used) if free else None

    def _get(self, pos: int) -> _Staging:
        entry = self._pending.pop(pos, None)
        if entry is not None:
            buf, fut = entry
            fut.result()
            return buf
        # Not read ahead (first use, or blocks run out of order): read it now on this thread.
        buf = self._free_buffer()
        if buf is None:  # every buffer is being read ahead for other blocks: wait for those
            for _, fut in self._pending.values():
                fut.result()
            self._pending.clear()
            buf = self._free_buffer()
        self._read(pos, buf)
        return buf

    def copy_to(self, pos: int, buf: torch.Tensor) -> int:
        """Copy sourced block `pos` into a ring slot (called on the copy stream); returns bytes."""
        staging = self._get(pos)
        n = self.layouts[pos].nbytes
        buf[:n].copy_(staging.data[:n], non_blocking=True)
        staging.copied = self.ops.event()
        staging.copied.record()  # on the copy stream: the caller issues copies inside it
        self._tick += 1
        staging.last_used = self._tick
        self._prefetch(self.order[(self.order.index(pos) + 1) % len(self.order)], avoid=staging)
        return n

    def _prefetch(self, pos: int, avoid: _Staging) -> None:
        if pos in self._pending:
            return
        buf = self._free_buffer(avoid=avoid)
        if buf is None:
            return
        self._tick += 1
        buf.last_used = self._tick
        self._pending[pos] = (buf, self._pool.submit(self._read, pos, buf))

    def close(self) -> None:
        """Wait for reads in flight, stop the reader and unpin the staging buffers."""
        for _, fut in self._pending.values():
            try:
                fut.result()
            except Exception:  # noqa: S110 - a failed read ahead that nobody waits for any more
                pass
        self._pending.clear()
        self._pool.shutdown(wait=True)
        for b in self.buffers:
            if b.pinned:
                b.pinned = False
                hostmem.LEDGER.release(self.nbytes)
                hostmem.unregister(b.data)
        self.buffers = []


class SourcedHost(BlockHost):
    """A streamed block read from the weight source each time it is needed (no host copy).

    Outside its forward the parameters point at zero-stride placeholders of the right shape and
    dtype (no memory); the original (meta) tensors are kept in `originals` for detach.
    """

    kind = "sourced"

    def __init__(self, stager: Stager, pos: int, layout: BlockLayout) -> None:
        self.stager, self.pos = stager, pos
        self.nbytes = layout.nbytes
        self.originals = [s.param.data for s in layout.params]
        self.views = [torch.empty((), dtype=s.dtype).expand(s.shape) for s in layout.params]

    def copy_to(self, buf: torch.Tensor, slot_views: list[torch.Tensor]) -> int:
        return self.stager.copy_to(self.pos, buf)
