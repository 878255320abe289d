"""WeightStreamer: keeps part of a model's blocks on the device and pages the rest in from host RAM.

attach(): plan residency within the budget (`planner`), put the non-block weights, the resident blocks
and a fixed ring of staging buffers on the device (lowering the budget and retrying on out-of-memory),
copy each streamed block into one contiguous pinned host buffer, then hand the per-block ordering to
`scheduler.Scheduler`. detach() undoes all of it.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import torch
from torch import nn

from .blocks import find_blocks
from .config import StreamingConfig
from .errors import StreamingError
from .estimate import estimate_blocks_seconds, measure_matmul_flops
from .host import BlockLayout, HostAllocator, HostBuffer, WeightSource, fill_block, set_param_data
from .planner import Plan, Timing, plan_residency
from .profile import measure_link_bandwidth
from .ring import DeviceOps, Ring
from .scheduler import Scheduler
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
        self._placed: list[tuple[object, str, torch.Tensor]] = []  # (owner, attr, was) undo log
        self._hooks: list = []
        self._ring: Ring | None = None
        self._ops: DeviceOps | None = None
        self._log: EventLog | None = None
        self._alloc: HostAllocator | None = None
        self._step = 0
        self._oom_retries = 0
        self._attach_s = 0.0
        self.scheduler: Scheduler | None = None
        self.timing: Timing | None = None  # what the planner used (measured or estimated times)

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
        block_seconds = cfg.block_seconds
        if block_seconds is None and cfg.block_flops is not None:
            # No measured times: estimate them from the owner's FLOP counts and a matmul probe in the
            # dtype each block computes in (float8 blocks at the FP8 rate where the GPU has it).
            block_seconds = estimate_blocks_seconds(
                [lay.module for lay in self._layouts],
                cfg.block_flops,
                self.device,
                self._compute_dtype(),
                cfg.flops_efficiency,
                cfg.matmul_flops,
                probe=measure_matmul_flops,
            )
        if block_seconds is not None:
            bw = cfg.link_bandwidth or measure_link_bandwidth(self.device)
            if bw:
                timing = Timing(tuple(block_seconds), bw)
        self.timing = timing
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
                    "%.2f GiB (was %.2f GiB).",
                    plan.device_bytes / 2**30,
                    new_budget / 2**30,
                    budget / 2**30,
                )
                budget = new_budget
                self._oom_retries += 1
        self.plan = plan
        self._streamed = plan.streamed_indices
        pin = cfg.pin_memory if cfg.pin_memory is not None else self.device.type == "cuda"
        self._alloc = HostAllocator(pin, cfg.pinned_cap)
        try:
            self._host, host_views = self._fill_host([self._layouts[i] for i in self._streamed])
        except BaseException:
            # e.g. a source that cannot read a tensor: take the weights off the device again. Buffers
            # already filled unpin themselves when dropped; their parameters keep the bytes.
            self._unplace()
            self._reset_state()
            raise
        if self._ring is not None:
            self.scheduler = Scheduler(
                self._ops,
                self._ring,
                self._log,
                [self._layouts[i] for i in self._streamed],
                self._host,
                host_views,
            )
            self.scheduler.wrap_all()
        self._hooks.append(self.model.register_forward_pre_hook(self._on_step))
        self.attached = True
        if self.scheduler is not None:
            self.scheduler.prime()
        self._attach_s = time.perf_counter() - t0
        logger.info(
            "weight streaming attached in %.1f s: %d blocks resident (%.2f GiB), %d streamed (%.2f GiB, "
            "%.2f GiB pinned), ring %d x %.2f GiB",
            self._attach_s,
            len(plan.resident_indices),
            plan.resident_bytes / 2**30,
            len(self._streamed),
            plan.streamed_bytes / 2**30,
            self._alloc.pinned_bytes / 2**30,
            plan.ring_slots,
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

    def _compute_dtype(self) -> torch.dtype:
        """The dtype the blocks compute in: the most common floating dtype of at least 2 bytes."""
        counts: dict[torch.dtype, int] = {}
        for lay in self._layouts:
            for s in lay.params:
                if s.dtype.is_floating_point and s.dtype.itemsize >= 2:
                    counts[s.dtype] = counts.get(s.dtype, 0) + s.nbytes // s.dtype.itemsize
        return max(counts, key=counts.get) if counts else torch.float32

    def detach(self) -> None:
        """Stop streaming: the model is back on the CPU in ordinary memory; device and pinned memory
        (ring, resident copies, page locks) are released."""
        if not self.attached:
            return
        self._ops.synchronize()
        for h in self._hooks:
            h.remove()
        if self.scheduler is not None:
            self.scheduler.unwrap_all()
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
            plan.device_bytes / 2**30,
            budget / 2**30,
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

    def _on_step(self, module, args) -> None:
        self._step += 1
        if self.scheduler is not None:
            self.scheduler.on_step(self._step)
        else:
            self._log.harvest()

    @property
    def ring(self) -> Ring | None:
        """The device staging buffers (None when nothing is streamed)."""
        return self._ring

    @property
    def host_buffers(self) -> list[HostBuffer]:
        """The streamed blocks' host buffers, in streamed order."""
        return self._host

    # ------------------------------------------------------------------ telemetry
    def telemetry(self, sync: bool = False) -> Telemetry:
        """Current figures; `sync=True` waits for queued work first so every event is counted."""
        t = Telemetry(oom_retries=self._oom_retries, attach_seconds=self._attach_s, steps=self._step)
        if not self.attached:
            return t
        plan = self.plan
        t.fixed_bytes, t.resident_bytes, t.streamed_bytes = (
            plan.fixed_bytes,
            plan.resident_bytes,
            plan.streamed_bytes,
        )
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
