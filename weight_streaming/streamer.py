"""WeightStreamer: keeps part of a model's blocks on the device and pages the rest in from host RAM.

Per streamed block, in static execution order (no traced first pass):
  enter block j: take the ring slot that holds j (copy issued earlier), issue copies for the next
      `prefetch_depth` streamed blocks into free slots, make the compute stream wait for j's copy,
      point j's parameters at views of the slot;
  leave block j (also on an exception): point j's parameters back at the host buffer, record on the
      compute stream that the slot's last reader is queued.
The copies after the last streamed block wrap around to the first ones, so the next forward pass (and
the first one, primed at attach) starts without waiting. Weights are never copied back to the host.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections import deque
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import torch
from torch import nn

from .blocks import find_blocks
from .config import StreamingConfig
from .errors import StreamingError
from .host import BlockLayout, HostAllocator, HostBuffer, WeightSource, fill_block, set_param_data
from .planner import Plan, Timing, plan_residency
from .profile import measure_link_bandwidth
from .ring import DeviceOps, Ring
from .telemetry import EventLog, Telemetry

logger = logging.getLogger(__name__)

# Threads that pin and fill streamed blocks at attach (page-locking scales with a few threads).
_FILL_THREADS = 4


def _to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Every device allocation of resident weights goes through here (tests simulate OOM on it)."""
    return t.to(device)


def _empty_device(nbytes: int, device: torch.device) -> torch.Tensor:
    """Allocates one ring slot (tests simulate OOM on it)."""
    return torch.empty(nbytes, dtype=torch.uint8, device=device)


class WeightStreamer:
    """Streams a model's blocks between host memory and one device.

    Args:
        model: any module whose blocks sit in `nn.ModuleList`s (named by `streamable_blocks` or `blocks`).
        config: budget, pinned cap and prefetch depth; default `StreamingConfig()` ("auto").
        device: the compute device; default the current CUDA device, else the CPU.
        blocks: attribute paths of the block lists in execution order (overrides `streamable_blocks`).
        source: optional object with `read_into(param_name, out)`: streamed (and meta) weights are read
            from it straight into their final buffers instead of being copied from the parameters.

    The model should be on the CPU (or meta, with a source) when attached. Use it for inference only
    (under `torch.no_grad()` or `torch.inference_mode()`), and don't move it while attached.
    """

    def __init__(
        self,
        model: nn.Module,
        config: StreamingConfig | None = None,
        device: torch.device | str | None = None,
        *,
        blocks: Sequence[str] | None = None,
        source: WeightSource | None = None,
    ) -> None:
        self.model = model
        self.config = config or StreamingConfig()
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        self.device = device
        self.block_paths = blocks
        self.source = source
        self.plan: Plan | None = None
        self.attached = False
        self._reset_state()

    def _reset_state(self) -> None:
        self._layouts: list[BlockLayout] = []
        self._streamed: list[int] = []  # layout index of each streamed position
        self._host: list[HostBuffer] = []  # per streamed position
        self._host_views: list[list[torch.Tensor]] = []
        self._placed: list[tuple[object, str, torch.Tensor]] = []  # (owner, attr, was) undo log
        self._hooks: list = []
        self._queue: deque = deque()  # (position, slot) copies issued ahead, in the order they are needed
        self._ring: Ring | None = None
        self._ops: DeviceOps | None = None
        self._log: EventLog | None = None
        self._alloc: HostAllocator | None = None
        self._step = 0
        self._oom_retries = 0
        self._attach_s = 0.0
        self._warned_grad = False

    # ------------------------------------------------------------------ attach / detach
    def attach(self) -> Plan:
        """Plan residency, place resident weights and the ring on the device, pin the streamed blocks.

        Returns:
            The plan in use.
        """
        if self.attached:
            return self.plan
        t0 = time.perf_counter()
        cfg = self.config
        named = find_blocks(self.model, self.block_paths)
        self._layouts = [BlockLayout.of(block, name) for name, block in named]
        in_blocks = {id(s.param) for lay in self._layouts for s in lay.params}
        fixed = [(n, p) for n, p in self.model.named_parameters() if id(p) not in in_blocks]
        fixed_bytes = sum(p.numel() * p.element_size() for _, p in fixed)
        fixed_bytes += sum(b.numel() * b.element_size() for _, b in self.model.named_buffers())
        self._ops = DeviceOps(self.device, cfg.timing)
        self._log = EventLog(self._ops)
        budget = cfg.resolve_budget(self.device)
        sizes = [lay.nbytes for lay in self._layouts]
        timing = None
        if cfg.block_seconds is not None:
            bw = cfg.link_bandwidth or measure_link_bandwidth(self.device)
            if bw:
                timing = Timing(tuple(cfg.block_seconds), bw)
        for attempt in range(cfg.max_oom_retries + 1):
            plan = plan_residency(sizes, budget, fixed_bytes=fixed_bytes, ring_slots=cfg.slots, timing=timing)
            try:
                self._place(plan, fixed)
                break
            except torch.OutOfMemoryError as exc:
                self._unplace()
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
                if attempt == cfg.max_oom_retries:
                    raise StreamingError(
                        f"out of device memory while attaching even at a budget of {budget / 2**30:.2f} GiB "
                        f"after {attempt} retries: free VRAM (close other models) or lower vram_budget."
                    ) from exc
                new_budget = int(min(budget, plan.device_bytes) * cfg.oom_shrink)
                logger.warning(
                    "out of device memory while placing %.2f GiB of weights; retrying with a budget of "
                    "%.2f GiB (was %.2f GiB).", plan.device_bytes / 2**30, new_budget / 2**30, budget / 2**30,
                )
                budget = new_budget
                self._oom_retries += 1
        self.plan = plan
        self._streamed = plan.streamed_indices
        pin = cfg.pin_memory if cfg.pin_memory is not None else self.device.type == "cuda"
        self._alloc = HostAllocator(pin, cfg.pinned_cap)
        self._host, self._host_views = self._fill_host([self._layouts[i] for i in self._streamed])
        if self._ring is not None:
            # Typed views of every (slot, position) pair, made once here: nothing is allocated or
            # created per step, and views made here are ordinary tensors even if the forward runs
            # under inference_mode.
            for slot in self._ring.slots:
                for j, idx in enumerate(self._streamed):
                    slot.views[j] = self._layouts[idx].views(slot.buf)
        for j, idx in enumerate(self._streamed):
            self._wrap(self._layouts[idx].module, j)
        self._hooks.append(self.model.register_forward_pre_hook(self._on_step))
        self.attached = True
        self._prime()
        self._attach_s = time.perf_counter() - t0
        logger.info(
            "weight streaming attached in %.1f s: %d blocks resident (%.2f GiB), %d streamed (%.2f GiB, "
            "%.2f GiB pinned), ring %d x %.2f GiB",
            self._attach_s, len(plan.resident_indices), plan.resident_bytes / 2**30, len(self._streamed),
            plan.streamed_bytes / 2**30, self._alloc.pinned_bytes / 2**30, plan.ring_slots,
            plan.ring_slot_bytes / 2**30,
        )
        return plan

    def _fill_host(self, layouts: list[BlockLayout]) -> tuple[list[HostBuffer], list[list[torch.Tensor]]]:
        """Allocate (pin) and fill each streamed block's host buffer, a few blocks at a time in parallel.

        Each block's old pageable copy is dropped as soon as it is copied, so host RAM holds at most
        `_FILL_THREADS` blocks twice. Blocks are handed out in order, so with a pinned cap the first
        streamed blocks are the pinned ones.
        """

        def one(lay: BlockLayout):
            buf = self._alloc.allocate(lay.nbytes)
            return buf, fill_block(lay, buf, self.source)

        if len(layouts) <= 1 or self.source is not None:  # a source may not be thread-safe
            done = [one(lay) for lay in layouts]
        else:
            with ThreadPoolExecutor(_FILL_THREADS) as pool:
                done = list(pool.map(one, layouts))
        return [b for b, _ in done], [v for _, v in done]

    def _move(self, owner: object, attr: str, t: torch.Tensor, name: str) -> None:
        """Put one resident tensor on the device, logging how to undo it."""
        if t.device.type == "meta":
            if self.source is None:
                raise StreamingError(
                    f"{name} is on the meta device and no weight source was given: pass source= or load "
                    "the weights before attaching."
                )
            loaded = torch.empty(t.shape, dtype=t.dtype)
            self.source.read_into(name, loaded)
            t = loaded
            if isinstance(owner, nn.Parameter):
                set_param_data(owner, loaded)  # materialised on the CPU first: an undo has real data
        moved = _to_device(t, self.device)
        if isinstance(owner, nn.Parameter):
            self._placed.append((owner, "data", owner.data))
            owner.data = moved
        else:  # a module's buffer dict
            self._placed.append((owner, attr, owner[attr]))
            owner[attr] = moved

    def _place(self, plan: Plan, fixed: list[tuple[str, nn.Parameter]]) -> None:
        # On a CPU device .to() returns the same tensor: no copy, but the same bookkeeping.
        for name, p in fixed:
            self._move(p, "data", p.data, name)
        for mod_name, mod in self.model.named_modules():
            for bname, b in list(mod._buffers.items()):
                if b is not None:
                    self._move(mod._buffers, bname, b, f"{mod_name}.{bname}" if mod_name else bname)
        for idx in plan.resident_indices:
            for s in self._layouts[idx].params:
                self._move(s.param, "data", s.param.data, s.name)
        if plan.ring_slots:
            self._ring = Ring(
                self._ops, [_empty_device(plan.ring_slot_bytes, self.device) for _ in range(plan.ring_slots)]
            )

    def _unplace(self) -> None:
        """Undo `_place` after an out-of-memory error: everything goes back where it was."""
        for owner, attr, was in reversed(self._placed):
            if isinstance(owner, nn.Parameter):
                owner.data = was.to("cpu")
            else:
                owner[attr] = was
        self._placed.clear()
        self._ring = None

    def detach(self) -> None:
        """Stop streaming: the model is back on the CPU in ordinary memory; device and pinned memory
        (ring, resident copies, page locks) are released."""
        if not self.attached:
            return
        self._ops.synchronize()
        for h in self._hooks:
            h.remove()
        for idx in self._streamed:
            self._layouts[idx].module.__dict__.pop("forward", None)
        for buf in self._host:
            self._alloc.release(buf)  # unpins; the parameters keep the bytes as pageable memory
        for owner, attr, _was in self._placed:
            if isinstance(owner, nn.Parameter):
                owner.data = owner.data.to("cpu")
            else:
                owner[attr] = owner[attr].to("cpu")
        self.attached = False
        self._reset_state()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def relieve(self) -> Plan:
        """Lower the resident set after a device out-of-memory in a forward pass (e.g. activations
        larger than estimated): re-plans at `oom_shrink` times the device bytes in use and re-attaches.
        """
        plan = self.plan
        budget = int(plan.device_bytes * self.config.oom_shrink)
        retries = self._oom_retries + 1
        logger.warning(
            "out of device memory in a forward pass; lowering the weight budget from %.2f GiB to %.2f GiB",
            plan.device_bytes / 2**30, budget / 2**30,
        )
        self.detach()
        self.config = dataclasses.replace(self.config, vram_budget=budget)
        new = self.attach()
        self._oom_retries = retries
        return new

    def call(self, fn, *args, **kwargs):
        """`fn(*args, **kwargs)`, retried with a lower resident set after a device out-of-memory error
        (at most `max_oom_retries` times). The caller must make `fn` safe to repeat (a denoising step is).
        """
        for attempt in range(self.config.max_oom_retries + 1):
            try:
                return fn(*args, **kwargs)
            except torch.OutOfMemoryError:
                if attempt == self.config.max_oom_retries or not self.attached:
                    raise
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
                self.relieve()
        raise AssertionError("unreachable")

    def __enter__(self) -> WeightStreamer:
        self.attach()
        return self

    def __exit__(self, *exc) -> None:
        self.detach()

    # ------------------------------------------------------------------ per-block scheduling
    def _wrap(self, module: nn.Module, j: int) -> None:
        inner = module.forward

        def forward(*args, **kwargs):
            slot = self._enter(j)
            try:
                return inner(*args, **kwargs)
            finally:
                self._leave(j, slot)

        # An instance attribute shadows the class's forward; detach removes it again.
        module.forward = forward

    def _on_step(self, module, args) -> None:
        self._step += 1
        self._log.harvest()
        self._prime()

    def _prime(self) -> None:
        """Make sure the copies for the first streamed blocks are issued (at attach, after a cancel)."""
        if not self._streamed:
            return
        if not self._queue or self._queue[0][0] != 0:
            self._queue.clear()
            self._topup(0)

    def _targets(self, start: int) -> list[int]:
        # Every slot but the running block's holds a block in flight: a planner-chosen deeper ring
        # deepens the prefetch with it.
        m = len(self._streamed)
        return [(start + k) % m for k in range(min(self.plan.ring_slots - 1, m))]

    def _topup(self, start: int, skip: int | None = None) -> None:
        queued = {s.index for _, s in self._queue}
        qpos = {p for p, _ in self._queue}
        for t in self._targets(start):
            if t in qpos or t == skip:
                continue
            slot = self._ring.find_holding(t, queued) or self._ring.free_slot(queued)
            if slot is None:
                break
            if slot.holds != t:
                self._issue_copy(t, slot)
            self._queue.append((t, slot))
            queued.add(slot.index)
            qpos.add(t)

    def _issue_copy(self, j: int, slot) -> None:
        ops, host = self._ops, self._host[j]
        n = host.data.numel()
        # SYNC (write-after-read): the copy stream waits until the compute stream has finished the last
        # block that read this slot; without it the copy could overwrite weights a queued kernel reads.
        ops.copy_stream.wait_event(slot.compute_done)
        with ops.on_copy_stream():
            start = ops.event(timing=True)
            if ops.timing:
                start.record(ops.copy_stream)
            slot.buf[:n].copy_(host.data, non_blocking=True)
            if ops.timing:
                end = ops.event(timing=True)
                end.record(ops.copy_stream)
                self._log.copy(start, end, n)
            # Producer side of the read-after-write sync in _enter.
            slot.copy_done.record(ops.copy_stream)
        slot.holds = j

    def _take(self, j: int):
        """The slot holding (or receiving) block j; issues the copy now if none was issued ahead."""
        while self._queue:
            pos, slot = self._queue[0]
            if pos == j:
                self._queue.popleft()
                return slot
            if all(p != j for p, _ in self._queue):
                break
            self._queue.popleft()  # a block was skipped: its slot is simply free again
        # Out of order (first block after a cancel, or blocks skipped): start over from j.
        self._queue.clear()
        slot = self._ring.find_holding(j, set()) or self._ring.free_slot(set())
        if slot is None:
            raise StreamingError("no free ring slot: streamed blocks are nested inside each other.")
        if slot.holds != j:
            self._issue_copy(j, slot)
        return slot

    def _enter(self, j: int):
        if not self._warned_grad and torch.is_grad_enabled():
            self._warned_grad = True
            logger.warning("streamed forward with autograd on: run under torch.no_grad(); gradients through "
                           "streamed weights would be wrong.")
        ops = self._ops
        slot = self._take(j)
        slot.busy = True
        self._ring.touch(slot)
        self._topup((j + 1) % len(self._streamed), skip=j)
        compute = ops.compute_stream()
        if ops.timing:
            t0 = ops.event(timing=True)
            t0.record(compute)
        # SYNC (read-after-write): the compute stream waits for the copy into this slot; without it the
        # block's kernels could read a half-copied weight. A GPU-side wait: the host does not block.
        compute.wait_event(slot.copy_done)
        if ops.timing:
            t1 = ops.event(timing=True)
            t1.record(compute)
            self._log.stall(t0, t1, self._step)
        for s, v in zip(self._layouts[self._streamed[j]].params, slot.views[j]):
            s.param.data = v
        return slot

    def _leave(self, j: int, slot) -> None:
        for s, v in zip(self._layouts[self._streamed[j]].params, self._host_views[j]):
            s.param.data = v
        # SYNC (write-after-read), consumer in _issue_copy: marks the point in the compute stream after
        # which no queued kernel reads this slot any more.
        slot.compute_done.record(self._ops.compute_stream())
        slot.busy = False

    # ------------------------------------------------------------------ telemetry
    def telemetry(self, sync: bool = False) -> Telemetry:
        """Current figures; `sync=True` waits for queued work first so every event is counted."""
        t = Telemetry(oom_retries=self._oom_retries, attach_seconds=self._attach_s, steps=self._step)
        if not self.attached:
            return t
        plan = self.plan
        t.fixed_bytes, t.resident_bytes, t.streamed_bytes = plan.fixed_bytes, plan.resident_bytes, plan.streamed_bytes
        t.ring_bytes = self._ring.nbytes if self._ring else 0
        t.pinned_bytes, t.pageable_bytes = self._alloc.pinned_bytes, self._alloc.pageable_bytes
        t.resident_blocks, t.streamed_blocks = len(plan.resident_indices), len(self._streamed)
        t.budget = plan.budget
        log = self._log
        log.harvest(wait=sync)
        t.copies, t.copied_bytes, t.copy_seconds = log.copies, log.copied_bytes, log.copy_ms / 1e3
        t.copy_bandwidth = log.copied_bytes / t.copy_seconds if t.copy_seconds > 0 else 0.0
        pending = log.pending_steps() | {self._step}
        done = {s: ms for s, ms in log.stall_ms.items() if s not in pending and s > 0}
        if done:
            t.last_step_stall_s = done[max(done)] / 1e3
            t.mean_step_stall_s = sum(done.values()) / len(done) / 1e3
        return t
