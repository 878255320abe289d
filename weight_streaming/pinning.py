"""Attach-time filling of the streamed blocks' host side, with progress.

For each streamed block, in execution order, one decision made on the attaching thread:
  reuse   a pinned buffer kept from the last detach whose views the parameters still are (no work);
  pin     reserve page-locked bytes (this streamer's cap and the process limit), then on a worker
          thread: allocate (huge pages), page-lock, copy from the parameters or read from the source;
  pageable  past the limit (or pinning off / refused) with the weights in host memory: stream from
          that memory in place (ordinary RAM or a mapped file's page cache), no second copy;
  sourced past the limit with meta parameters and a source: read from the file each time (`staging`).
Workers run in parallel (page-locking and copying run without the GIL); a source that is not declared
thread-safe is read from one thread. Progress is reported on the attaching thread only.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass

import torch

from . import hostmem
from .errors import StreamingError
from .host import BlockHost, BlockLayout, HostBuffer, InPlaceHost, WeightSource, fill_block, set_param_data
from .ring import DeviceOps
from .staging import SourcedHost, Stager

logger = logging.getLogger(__name__)

GiB = 1 << 30


def default_pin_threads() -> int:
    """Threads that page-lock and fill blocks at attach: up to 8 (page-locking scales with a few)."""
    return max(1, min(8, os.cpu_count() or 1))


@dataclass(frozen=True)
class AttachProgress:
    """How far an attach is, for a progress bar ("pinning 41.0 of 53.0 GiB").

    Attributes:
        stage: "placing" (weights kept on the device are copied there), "pinning" (streamed blocks
            go into page-locked RAM), "reading" (the same, read from the weight source) or "done".
        done: bytes handled so far, all stages together.
        total: bytes this attach moves, all stages together (kept pinned buffers need no work and
            are not counted).
    """

    stage: str
    done: int
    total: int

    def text(self) -> str:
        return f"{self.stage} {self.done / GiB:.1f} of {self.total / GiB:.1f} GiB"


class Reporter:
    """Calls the progress callback (on the attaching thread); exceptions it raises abort the attach."""

    def __init__(self, callback: Callable[[AttachProgress], object] | None, total: int) -> None:
        self.callback, self.total, self.done = callback, total, 0

    def add(self, stage: str, nbytes: int) -> None:
        self.done += nbytes
        self.emit(stage)

    def emit(self, stage: str) -> None:
        if self.callback is not None:
            self.callback(AttachProgress(stage, min(self.done, self.total), self.total))


@dataclass
class FillStats:
    """What the host side of one attach ended up as (bytes per kind) and how long pinning took."""

    pinned: int = 0  # newly page-locked and filled
    reused: int = 0  # kept from the last detach, already page-locked
    pageable: int = 0
    sourced: int = 0
    staging: int = 0
    seconds: float = 0.0
    limit_hit: bool = False
    pin_failed: bool = False

    @property
    def pin_rate(self) -> float:
        """Bytes newly pinned per second (0 when nothing was pinned)."""
        return self.pinned / self.seconds if self.seconds > 0 and self.pinned else 0.0


class _PinWork:
    """One block to fill on a worker thread: page-locked (`pin`, bytes reserved) or a plain copy."""

    def __init__(self, layout: BlockLayout, source: WeightSource | None, shared: dict, pin: bool) -> None:
        self.layout, self.source, self.shared, self.pin = layout, source, shared, pin

    def run(self) -> BlockHost | None:
        """The filled buffer, an in-place host if pinning was refused, or None: read it from the source."""
        lay, n = self.layout, self.layout.nbytes
        data = hostmem.alloc_host(n)
        pinned = False
        if not self.pin:
            pass
        elif not self.shared["failed"]:
            try:
                hostmem.register(data)
                pinned = True
            except RuntimeError as exc:
                with self.shared["lock"]:
                    first, self.shared["failed"] = not self.shared["failed"], True
                if first:  # after one refusal stop trying: the OS will not lock more memory
                    logger.warning(
                        "could not pin host memory (%s): the remaining streamed blocks copy from ordinary "
                        "memory, several times slower. Free RAM or lower the pinned-memory cap.",
                        exc,
                    )
        all_meta = all(s.param.device.type == "meta" for s in lay.params)
        if self.pin and not pinned:
            hostmem.LEDGER.release(n)
            if lay.on_cpu():  # never hold a second, unpinned copy: stream from where it is
                return InPlaceHost(lay)
            if self.source is not None and all_meta:
                return None
        originals = [s.param.data for s in lay.params] if all_meta else None
        old = [s.param.data for s in lay.params]
        try:
            views = fill_block(lay, data, self.source)
        except BaseException:
            if pinned:
                hostmem.unregister(data)
                hostmem.LEDGER.release(n)
            raise
        # The block's weights viewed a memory-mapped file: its pages go now that the bytes are here,
        # so the model is not held twice while the rest is filled.
        hostmem.page_out_file_views(old, self.shared["files"])
        return HostBuffer(data, pinned, views, originals)


def fill_host(
    layouts: list[BlockLayout],
    *,
    ops: DeviceOps,
    kept: dict[str, HostBuffer],
    source: WeightSource | None,
    pin: bool,
    cap: int | None,
    threads: int,
    reporter: Reporter,
    owner: object,
) -> tuple[list[BlockHost], Stager | None, FillStats]:
    """Give every streamed block its host side (see the module docstring).

    Args:
        layouts: the streamed blocks in execution order.
        ops: the device's streams and events (for the staging of sourced blocks).
        kept: pinned buffers kept from the last detach, by block prefix; entries used here are removed
            (the caller releases what is left).
        source: the weight source, or None.
        pin: page-lock at all (False: ``--disable-pinned-memory``, or a CPU device).
        cap: this streamer's own cap on page-locked bytes (None: only the process limit).
        threads: worker threads for pinning.
        reporter: progress.
        owner: the streamer (its own kept buffers are never taken back from it by the ledger).

    Returns:
        (hosts in `layouts` order, the stager for sourced blocks or None, what was done).
    """
    t0 = time.perf_counter()
    stats = FillStats()
    hosts: list[BlockHost | None] = [None] * len(layouts)
    work: dict[int, _PinWork] = {}
    sourced: list[int] = []
    shared = {"failed": False, "lock": threading.Lock(), "files": []}
    mine = copied = 0
    reused: set[int] = set()
    for lay in layouts:  # before any reservation, so an error leaves nothing reserved
        if source is None and any(s.param.device.type == "meta" for s in lay.params):
            raise StreamingError(
                f"block {lay.prefix} is on the meta device and no weight source was given: pass source= "
                "(an object with read_into(name, out)) or load the weights before attaching."
            )
    copy_limit = hostmem.default_pinned_limit() if not pin else 0
    for j, lay in enumerate(layouts):
        buf = kept.pop(lay.prefix, None)
        if buf is not None and lay.points_into(buf.data):
            # Still page-locked, or taken back by the ledger and page-locked again in place (no copy).
            if buf.pinned or (pin and (cap is None or mine + buf.nbytes <= cap) and buf.pin()):
                mine += buf.nbytes
                reused.add(j)
            hosts[j] = buf
            continue
        if buf is not None:
            buf.release()
        has_data = all(s.param.device.type != "meta" for s in lay.params)
        n = lay.nbytes
        if pin and (cap is None or mine + n <= cap) and hostmem.LEDGER.try_reserve(n, exclude=owner):
            mine += n
            work[j] = _PinWork(lay, source, shared, pin=True)
            continue
        stats.limit_hit |= pin
        if lay.on_cpu():
            hosts[j] = InPlaceHost(lay)
        elif source is not None and not has_data:
            # Pinning off: an ordinary host copy read from the source while RAM allows (the same RAM
            # rule as the pinned limit). Past the limit: nothing is copied, the file is read each step.
            if not pin and copied + n <= copy_limit:
                copied += n
                work[j] = _PinWork(lay, source, shared, pin=False)
            else:
                sourced.append(j)
        else:  # weights on another device: a plain pageable copy
            data = hostmem.alloc_host(n)
            hosts[j] = HostBuffer(data, False, fill_block(lay, data, None))
    stage = "reading" if source is not None else "pinning"
    serial = source is not None and not getattr(source, "thread_safe", False)
    shared["files"] = hostmem.mapped_file_ranges() if work else []
    _run_work(work, hosts, sourced, 1 if serial else threads, reporter, stage)
    stats.pin_failed = shared["failed"]
    stager = None
    if sourced:
        stager = Stager(ops, source, {j: layouts[j] for j in sourced}, pin and not shared["failed"])
        for j in sourced:
            host = SourcedHost(stager, j, layouts[j])
            for s, placeholder in zip(layouts[j].params, host.views):
                set_param_data(s.param, placeholder)
            hosts[j] = host
        stats.staging = stager.staging_bytes
    for j, host in enumerate(hosts):
        if host.kind == "pinned":
            if j in reused:
                stats.reused += host.nbytes
            else:
                stats.pinned += host.nbytes
        elif host.kind == "pageable":
            stats.pageable += host.nbytes
        else:
            stats.sourced += host.nbytes
    stats.seconds = time.perf_counter() - t0
    _log_fallbacks(stats, pin, cap, ops.device)
    return hosts, stager, stats


def _run_work(
    work: dict[int, _PinWork],
    hosts: list,
    sourced: list[int],
    threads: int,
    reporter: Reporter,
    stage: str,
) -> None:
    """Run the pin jobs on `threads` workers, reporting progress; on any error undo the reservations."""
    if not work:
        return
    pool = ThreadPoolExecutor(max(1, min(threads, len(work))), thread_name_prefix="weight-pin")
    futures: dict[Future, int] = {pool.submit(w.run): j for j, w in work.items()}
    try:
        pending = set(futures)
        while pending:
            done, pending = wait(pending, timeout=0.25, return_when=FIRST_COMPLETED)
            for fut in done:
                j = futures[fut]
                result = fut.result()  # re-raises a worker's error here
                if result is None:
                    sourced.append(j)
                else:
                    hosts[j] = result
                reporter.add(stage, work[j].layout.nbytes)
    except BaseException:
        # Jobs never started give their reservation back; running ones finish and their buffers
        # unpin themselves when dropped.
        cancelled = [j for fut, j in futures.items() if fut.cancel()]
        pool.shutdown(wait=True)
        for j in cancelled:
            hostmem.LEDGER.release(work[j].layout.nbytes)
        raise
    pool.shutdown(wait=True)
    sourced.sort()


def _log_fallbacks(stats: FillStats, pin: bool, cap: int | None, device: torch.device) -> None:
    """One line when streamed blocks are not all page-locked, saying how much and why."""
    slow = stats.pageable + stats.sourced
    if not slow:
        return
    where = []
    if stats.pageable:
        where.append(f"{stats.pageable / GiB:.2f} GiB copy from pageable memory or the page cache")
    if stats.sourced:
        where.append(f"{stats.sourced / GiB:.2f} GiB are read from the weight file each step")
    where = " and ".join(where)
    if not pin:
        level = logging.INFO if device.type == "cuda" else logging.DEBUG
        logger.log(level, "pinned memory is off: streamed weights: %s (slower than pinned).", where)
        return
    if stats.pin_failed:
        why = "the OS refused to page-lock more memory"
    else:
        limit = hostmem.pinned_limit()
        why = f"pinned-memory limit reached ({hostmem.pinned_in_use() / GiB:.2f} of {limit / GiB:.2f} GiB"
        why += f" in use, this model's cap {cap / GiB:.2f} GiB)" if cap is not None else " in use)"
    logger.warning(
        "%s: streamed weights: %s, several times slower than pinned. Raise the pinned-memory cap if RAM "
        "allows, free RAM, or give the model more VRAM.",
        why,
        where,
    )
