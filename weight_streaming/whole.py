"""Page-locked host copies of the weights a streamer places on the device whole
(`StreamingConfig.pin_resident`): resident blocks and the non-block parameters.

Filled in parallel at attach (as the streamed blocks' buffers are), as far as the limits allow after
the streamed blocks' share; each is then placed with one copy, and the parameters point into it
between attaches, so a detach copies nothing back to the host and host memory does not grow. A
detach with ``keep_pinned`` keeps them for the next attach (re-planned for another budget, a block
that becomes streamed streams from its copy); otherwise they are unpinned and the bytes stay as
ordinary memory (or, read from a weight source onto meta parameters, are freed).
"""

from __future__ import annotations

import logging
import threading
import time

from torch import nn

from . import hostmem
from .config import StreamingConfig
from .host import BlockHost, BlockLayout, HostBuffer, WeightSource, set_param_data
from .pinning import FillStats, Reporter, _PinWork, _run_work, default_pin_threads
from .planner import Plan

logger = logging.getLogger(__name__)

GiB = 1 << 30
# Prefix of the layout that holds a model's non-block parameters (never a block's "path.index").
FIXED = "<non-block>"


def pin_whole(
    layouts: list[BlockLayout],
    *,
    kept: dict[str, HostBuffer],
    source: WeightSource | None,
    cap: int | None,
    keep_free: int,
    threads: int,
    reporter: Reporter,
    owner: object,
) -> tuple[dict[str, HostBuffer], FillStats]:
    """Page-locked host copies of weights that are placed on the device whole (resident blocks, the
    non-block parameters), so placing them is one DMA copy each, several worker threads filling them.

    The parameters are pointed into the copies (their old memory, e.g. a mapped file's pages, is
    dropped), so the host never holds them twice and taking them off the device copies nothing back.
    Only as far as the limits allow after ``keep_free`` bytes are left for the streamed blocks (those
    need page-locked memory at every step, these only while being placed); a layout that gets no
    buffer is left where it is and placed from there.

    Args:
        layouts: the layouts to pin, most wanted first.
        kept: pinned buffers kept from the last detach, by prefix; entries used here are removed.
        source: the weight source (read from it instead of copying the parameters), or None.
        cap: this streamer's own cap on page-locked bytes (None: only the process limit).
        keep_free: page-locked bytes to leave for the streamed blocks of the same attach.
        threads: worker threads.
        reporter: progress ("pinning").
        owner: the streamer (its own kept buffers are never taken back from it by the ledger).

    Returns:
        (buffers by layout prefix, what was done: ``pinned`` new bytes, ``reused`` kept bytes).
    """
    t0 = time.perf_counter()
    stats = FillStats()
    out: dict[str, HostBuffer] = {}
    work: dict[int, _PinWork] = {}
    shared = {"failed": False, "lock": threading.Lock(), "files": []}
    room = None if cap is None else max(0, cap - keep_free)
    mine = 0
    for j, lay in enumerate(layouts):
        buf = kept.pop(lay.prefix, None)
        if buf is not None and lay.points_into(buf.data):
            # Kept (or taken back by the ledger and page-locked again in place): nothing is copied.
            if buf.pinned or ((room is None or mine + buf.nbytes <= room) and buf.pin()):
                mine += buf.nbytes
                stats.reused += buf.nbytes
                buf.layout = lay
                out[lay.prefix] = buf
            continue  # else the parameters keep the bytes there, as ordinary memory
        if buf is not None:
            buf.release()
        if source is None and any(s.param.device.type == "meta" for s in lay.params):
            continue  # placing it raises the error that names the missing source
        n = lay.nbytes
        if (room is None or mine + n <= room) and hostmem.LEDGER.try_reserve(n, owner, keep_free):
            mine += n
            work[j] = _PinWork(lay, source, shared, pin=True)
        else:
            stats.limit_hit = True
    hosts: list[BlockHost | None] = [None] * len(layouts)
    serial = source is not None and not getattr(source, "thread_safe", False)
    shared["files"] = hostmem.mapped_file_ranges() if work else []
    _run_work(work, hosts, [], 1 if serial else threads, reporter, "reading" if source else "pinning")
    for j in work:
        host = hosts[j]
        if isinstance(host, HostBuffer) and host.pinned:
            host.layout = layouts[j]
            out[layouts[j].prefix] = host
            stats.pinned += host.nbytes
    stats.pin_failed = shared["failed"]
    stats.seconds = time.perf_counter() - t0
    if stats.limit_hit or stats.pin_failed:
        missing = sum(lay.nbytes for lay in layouts) - stats.pinned - stats.reused
        logger.info(
            "%.2f GiB of weights kept on the device are placed from pageable memory (%s): slower to "
            "place, never copied back",
            missing / GiB,
            "the OS refused to page-lock more" if stats.pin_failed else "pinned-memory limit",
        )
    return out, stats


def pin_for_plan(
    model: nn.Module,
    layouts: list[BlockLayout],
    plan: Plan,
    fixed: list[tuple[str, nn.Parameter]],
    kept: dict[str, HostBuffer],
    reusable: set[int],
    config: StreamingConfig,
    source: WeightSource | None,
    progress,
    owner: object,
) -> tuple[Reporter, BlockLayout | None, dict[str, HostBuffer], FillStats]:
    """Page-locked copies of what ``plan`` places whole (its resident blocks, then the non-block
    parameters), leaving the page-locked bytes its streamed blocks need.

    Args:
        model: the streamed model.
        layouts: every block's layout, in execution order.
        plan: the residency plan of this attach (its first attempt).
        fixed: the non-block (name, parameter) pairs.
        kept: pinned buffers kept from the last detach (entries used here are removed).
        reusable: indices of blocks whose kept buffer still matches.
        config: the streamer's config (pinned cap, threads).
        source: the weight source, or None.
        progress: the attach's progress callback.
        owner: the streamer.

    Returns:
        (the attempt's reporter: these copies, then placing and pinning the streamed blocks; the
        non-block layout or None; the buffers by prefix; what was done).
    """
    todo = [layouts[i] for i in plan.resident_indices]
    fixed_layout = BlockLayout.of_params(model, FIXED, fixed) if fixed else None
    if fixed_layout is not None:
        todo.append(fixed_layout)
    new = sum(
        lay.nbytes for lay in todo if not (lay.prefix in kept and lay.points_into(kept[lay.prefix].data))
    )
    streamed_new = sum(plan.block_sizes[i] for i in plan.streamed_indices if i not in reusable)
    reporter = Reporter(progress, new + plan.fixed_bytes + plan.resident_bytes + streamed_new)
    whole, stats = pin_whole(
        todo,
        kept=kept,
        source=source,
        cap=config.pinned_cap,
        keep_free=plan.streamed_bytes,
        threads=config.pin_threads or default_pin_threads(),
        reporter=reporter,
        owner=owner,
    )
    return reporter, fixed_layout, whole, stats


def put_back(whole: dict[str, HostBuffer], kept: dict[str, HostBuffer], keep_pinned: bool) -> None:
    """At detach, once the parameters point at their host copies again: keep the page-locked ones
    for the next attach, or unpin them (blocks read from a weight source go back to meta)."""
    for prefix, buf in whole.items():
        if keep_pinned and buf.pinned:
            kept[prefix] = buf
            continue
        if buf.originals is not None:
            for s, t in zip(buf.layout.params, buf.originals):
                set_param_data(s.param, t)
        buf.release()
