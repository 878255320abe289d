"""WeightStreamer: keeps part of a model's blocks on the device and pages the rest in from host RAM.

attach(): plan residency within the budget (`planner`), put the non-block weights, the resident blocks
and a fixed ring of staging buffers on the device (lowering the budget and retrying on out-of-memory),
give each streamed block its host side (`pinning`: page-locked within the limits, else streamed from
where it already is or from its file), then hand the per-block ordering to `scheduler.Scheduler`.
detach() undoes all of it; detach(keep_pinned=True) gives the device memory back but keeps the pinned
host buffers, so the next attach (after an unload, or a lower budget after an out-of-memory) reuses
them instead of pinning again.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable, Sequence

import torch
from torch import nn

from . import hostmem
from .blocks import find_blocks
from .config import StreamingConfig
from .errors import StreamingError
from .estimate import estimate_blocks_seconds, measure_matmul_flops
from .host import BlockHost, BlockLayout, HostBuffer, WeightSource, set_param_data
from .pinning import AttachProgress, FillStats, Reporter, default_pin_threads, fill_host
from .planner import Plan, Timing, plan_residency
from .profile import measure_link_bandwidth
from .ring import DeviceOps, Ring
from .scheduler import Scheduler
from .staging import Stager
from .telemetry import EventLog, Telemetry
from .whole import pin_for_plan, put_back

logger = logging.getLogger(__name__)

GiB = 1 << 30


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
            from it straight into their final buffers instead of being copied from the parameters;
            streamed blocks past the pinned-memory limit whose parameters are on the meta device are
            read from it each time they run (nothing is memory-mapped). Set `thread_safe = True` on
            it to let attach read blocks in parallel.
        progress: optional callback taking an `AttachProgress` (stage, bytes done, bytes total), called
            on the attaching thread while weights are placed and pinned; an exception it raises
            (e.g. a user's cancel) aborts the attach and leaves the model detached.

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
        progress: Callable[[AttachProgress], object] | None = None,
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
        self.progress = progress
        self.plan: Plan | None = None
        self.attached = False
        # Pinned host buffers kept across a detach(keep_pinned=True), by block prefix.
        self._kept: dict[str, HostBuffer] = {}
        self._lock = threading.RLock()
        self._reset_state()

    def _reset_state(self) -> None:
        self._layouts: list[BlockLayout] = []
        self._streamed: list[int] = []  # layout index of each streamed position
        self._host: list[BlockHost] = []  # per streamed position
        self._placed: list[tuple[object, str, torch.Tensor]] = []  # (owner, attr, was) undo log
        self._hooks: list = []
        self._ring: Ring | None = None
        self._ops: DeviceOps | None = None
        self._log: EventLog | None = None
        self._stager: Stager | None = None
        self._fill = FillStats()
        # Page-locked host copies of the weights placed whole (pin_resident), by layout prefix.
        self._whole: dict[str, HostBuffer] = {}
        self._whole_fill = FillStats()
        self._fixed_layout: BlockLayout | None = None
        self._step = 0
        self._oom_retries = 0
        self._attach_s = 0.0
        self.scheduler: Scheduler | None = None
        self.timing: Timing | None = None  # what the planner used (measured or estimated times)

    # ------------------------------------------------------------------ attach / detach
    def attach(self, progress: Callable[[AttachProgress], object] | None = None) -> Plan:
        """Plan residency, place resident weights and the ring on the device, pin the streamed blocks.

        Args:
            progress: callback for this attach (default: the one given to the constructor).

        Returns:
            The plan in use.
        """
        with self._lock:
            if self.attached:
                return self.plan
            hostmem.LEDGER.forget_idle(self)
            try:
                return self._attach(progress or self.progress)
            except BaseException:
                self._keep_whole()
                if self._kept:
                    hostmem.LEDGER.add_idle(self)
                raise

    def _keep_whole(self) -> None:
        """A failed attach keeps the page-locked copies of whole-placed weights for the next one (the
        parameters point into them)."""
        for prefix, buf in self._whole.items():
            self._kept.setdefault(prefix, buf)
        self._whole = {}

    def _attach(self, progress) -> Plan:
        t0 = time.perf_counter()
        cfg = self.config
        # blocks=() streams nothing: every weight is placed whole (e.g. a VAE kept resident).
        named = [] if self.block_paths == () else find_blocks(self.model, self.block_paths)
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
        # Blocks whose kept pinned buffer still matches need no work at this attach.
        reusable = {
            i
            for i, lay in enumerate(self._layouts)
            if lay.prefix in self._kept and lay.points_into(self._kept[lay.prefix].data)
        }
        pin = cfg.pin_memory if cfg.pin_memory is not None else self.device.type == "cuda"
        plan = plan_residency(sizes, budget, fixed_bytes=fixed_bytes, ring_slots=cfg.slots, timing=timing)
        reporter = None
        if pin and cfg.pin_resident:
            reporter, self._fixed_layout, self._whole, self._whole_fill = pin_for_plan(
                self.model, self._layouts, plan, fixed, self._kept, reusable, cfg, self.source, progress, self
            )
        for attempt in range(cfg.max_oom_retries + 1):
            if attempt:
                plan = plan_residency(
                    sizes, budget, fixed_bytes=fixed_bytes, ring_slots=cfg.slots, timing=timing
                )
            to_pin = sum(sizes[i] for i in plan.streamed_indices if i not in reusable)
            if attempt or reporter is None:
                reporter = Reporter(progress, fixed_bytes + plan.resident_bytes + to_pin)
            try:
                self._place(plan, fixed, reporter)
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
            except BaseException:  # e.g. the progress callback cancelled
                self._unplace()
                self._keep_whole()
                self._reset_state()
                raise
        self.plan = plan
        self._streamed = plan.streamed_indices
        streamed = {self._layouts[i].prefix for i in self._streamed}
        for prefix in [p for p in self._whole if p in streamed]:
            self._kept[prefix] = self._whole.pop(prefix)  # streamed after an out-of-memory retry
        for prefix in [p for p in self._kept if p not in streamed]:
            self._drop_kept(prefix)  # the block is resident now (or gone): no page lock needed
        whole_pinned = sum(b.nbytes for b in self._whole.values())
        cap = cfg.pinned_cap if cfg.pinned_cap is None else max(0, cfg.pinned_cap - whole_pinned)
        try:
            self._host, self._stager, self._fill = fill_host(
                [self._layouts[i] for i in self._streamed],
                ops=self._ops,
                kept=self._kept,
                source=self.source,
                pin=pin,
                cap=cap,
                threads=cfg.pin_threads or default_pin_threads(),
                reporter=reporter,
                owner=self,
            )
        except BaseException:
            # e.g. a source that cannot read a tensor, or a cancel: take the weights off the device
            # again. Buffers already filled unpin themselves when dropped; their parameters keep the bytes.
            self._unplace()
            self._keep_whole()
            self._reset_state()
            raise
        self._kept.clear()
        if self._ring is not None:
            self.scheduler = Scheduler(
                self._ops, self._ring, self._log, [self._layouts[i] for i in self._streamed], self._host
            )
            self.scheduler.wrap_all()
        self._hooks.append(self.model.register_forward_pre_hook(self._on_step))
        self.attached = True
        if self.scheduler is not None:
            self.scheduler.prime()
        reporter.emit("done")
        self._attach_s = time.perf_counter() - t0
        f, w = self._fill, self._whole_fill
        logger.info(
            "weight streaming attached in %.1f s: %d blocks resident (%.2f GiB; %.2f GiB placed from "
            "page-locked copies, %.2f GiB of them kept from before), %d streamed (%.2f GiB: "
            "%.2f GiB newly pinned at %.1f GB/s, %.2f GiB kept pinned from before, %.2f GiB pageable, "
            "%.2f GiB read from the file each step), ring %d x %.2f GiB",
            self._attach_s,
            len(plan.resident_indices),
            plan.resident_bytes / GiB,
            (w.pinned + w.reused) / GiB,
            w.reused / GiB,
            len(self._streamed),
            plan.streamed_bytes / GiB,
            f.pinned / GiB,
            f.pin_rate / 1e9,
            f.reused / GiB,
            f.pageable / GiB,
            f.sourced / GiB,
            plan.ring_slots,
            plan.ring_slot_bytes / GiB,
        )
        return plan

    def _place_whole(self, layout: BlockLayout, buf: HostBuffer) -> None:
        """One copy of a page-locked block onto the device; its parameters become views of it."""
        moved = _to_device(buf.data, self.device)
        for s, view in zip(layout.params, layout.views(moved)):
            self._placed.append((s.param, "data", s.param.data))
            set_param_data(s.param, view)

    def _drop_kept(self, prefix: str) -> None:
        """Unpin a kept buffer whose block is no longer streamed; the undo log keeps its bytes (or, for
        a block first read from the source, points back at the meta tensors so detach frees them)."""
        buf = self._kept.pop(prefix)
        if buf.originals is not None and buf.layout is not None:
            back = {id(s.param): t for s, t in zip(buf.layout.params, buf.originals)}
            self._placed = [(o, a, back.get(id(o), was)) for o, a, was in self._placed]
        buf.release()

    def _move(self, owner: object, attr: str, t: torch.Tensor, name: str) -> None:
        """Put one resident tensor on the device, logging how to undo it."""
        was = t
        if t.device.type == "meta":
            if self.source is None:
                raise StreamingError(
                    f"{name} is on the meta device and no weight source was given: pass source= or load "
                    "the weights before attaching."
                )
            # Read into a temporary host tensor; the undo log keeps the meta tensor, so no host copy
            # of resident weights outlives the copy to the device.
            t = torch.empty(t.shape, dtype=t.dtype)
            self.source.read_into(name, t)
        moved = _to_device(t, self.device)
        self._placed.append((owner, attr, was))
        if isinstance(owner, nn.Parameter):
            set_param_data(owner, moved)
        else:  # a module's buffer dict
            owner[attr] = moved

    def _place(self, plan: Plan, fixed: list[tuple[str, nn.Parameter]], reporter: Reporter) -> None:
        # On a CPU device .to() returns the same tensor: no copy, but the same bookkeeping.
        done = 0
        whole = self._fixed_layout and self._whole.get(self._fixed_layout.prefix)
        if whole:
            self._place_whole(self._fixed_layout, whole)
        else:
            for name, p in fixed:
                self._move(p, "data", p.data, name)
        for mod_name, mod in self.model.named_modules():
            for bname, b in list(mod._buffers.items()):
                if b is not None:
                    self._move(mod._buffers, bname, b, f"{mod_name}.{bname}" if mod_name else bname)
                    done += b.numel() * b.element_size()
        done += sum(p.numel() * p.element_size() for _, p in fixed)
        reporter.add("placing", done)
        for idx in plan.resident_indices:
            lay = self._layouts[idx]
            whole = self._whole.get(lay.prefix)
            if whole is not None:
                self._place_whole(lay, whole)
            else:
                for s in lay.params:
                    self._move(s.param, "data", s.param.data, s.name)
            reporter.add("placing", lay.nbytes)
        if plan.ring_slots:
            self._ring = Ring(
                self._ops, [_empty_device(plan.ring_slot_bytes, self.device) for _ in range(plan.ring_slots)]
            )

    def _restore(self, owner: object, attr: str, was: torch.Tensor) -> None:
        if isinstance(owner, nn.Parameter):
            # Weights are read-only: the host tensor they came from is still right (no copy back).
            set_param_data(owner, was if was.device.type in ("cpu", "meta") else owner.data.to("cpu"))
        else:  # buffers may have been written by the model: bring the current values back
            owner[attr] = was if was.device.type == "meta" else owner[attr].to("cpu")

    def _unplace(self) -> None:
        """Undo `_place`: everything goes back where it was."""
        for owner, attr, was in reversed(self._placed):
            self._restore(owner, attr, was)
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

    def detach(self, keep_pinned: bool = False) -> None:
        """Stop streaming: the model is back on the CPU and device memory (ring, resident copies) is
        released.

        Args:
            keep_pinned: keep the streamed blocks' page-locked host buffers (the parameters point into
                them), so the next attach reuses them instead of pinning again. They stay within the
                process-wide pinned limit and are taken back by it, oldest first, when another model
                needs page-locked memory; `release_pinned()` gives them back at once. False releases
                them now (the parameters keep the bytes as ordinary memory; blocks first read from the
                weight source return to the meta device, freeing the host copy).
        """
        with self._lock:
            if not self.attached:
                if not keep_pinned:
                    self.release_pinned()
                return
            self._ops.synchronize()
            for h in self._hooks:
                h.remove()
            if self.scheduler is not None:
                self.scheduler.unwrap_all()
            if self._stager is not None:
                self._stager.close()
            for j, host in enumerate(self._host):
                lay = self._layouts[self._streamed[j]]
                if keep_pinned and isinstance(host, HostBuffer) and host.pinned:
                    host.layout = lay
                    self._kept[lay.prefix] = host
                    continue
                if host.originals is not None:
                    for s, t in zip(lay.params, host.originals):
                        set_param_data(s.param, t)
                host.release()
            self._unplace()  # weights point at their host memory again: nothing is copied back
            put_back(self._whole, self._kept, keep_pinned)
            self.attached = False
            self._reset_state()
            if self._kept:
                hostmem.LEDGER.add_idle(self)
            if self.device.type == "cuda":
                torch.cuda.empty_cache()

    def release_pinned(self) -> int:
        """Give back the page-locked buffers kept by `detach(keep_pinned=True)`.

        Returns:
            Bytes unpinned (0 while attached: buffers in use are released by `detach`).
        """
        with self._lock:
            freed = 0
            for buf in self._kept.values():
                freed += buf.nbytes if buf.pinned else 0
                lay = buf.layout
                if buf.originals is not None and lay is not None and lay.points_into(buf.data):
                    for s, t in zip(lay.params, buf.originals):
                        set_param_data(s.param, t)
                buf.release()
            self._kept.clear()
            hostmem.LEDGER.forget_idle(self)
            return freed

    def reclaim_pinned(self) -> int:
        """For the process-wide ledger: release kept buffers unless this streamer is busy."""
        if not self._lock.acquire(blocking=False):
            return 0
        try:
            return 0 if self.attached else self.release_pinned()
        finally:
            self._lock.release()

    @property
    def kept_pinned_bytes(self) -> int:
        """Page-locked bytes kept for a quick re-attach (0 while attached)."""
        return sum(b.nbytes for b in self._kept.values() if b.pinned)

    def relieve(self) -> Plan:
        """Lower the resident set after a device out-of-memory in a forward pass (e.g. activations
        larger than estimated): re-plans at `oom_shrink` times the device bytes in use and re-attaches,
        reusing the pinned host buffers of blocks that were streamed already.
        """
        plan = self.plan
        budget = int(plan.device_bytes * self.config.oom_shrink)
        retries = self._oom_retries + 1
        logger.warning(
            "out of device memory in a forward pass; lowering the weight budget from %.2f GiB to %.2f GiB",
            plan.device_bytes / 2**30,
            budget / 2**30,
        )
        self.detach(keep_pinned=True)
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
    def host_buffers(self) -> list[BlockHost]:
        """The streamed blocks' host sides, in streamed order."""
        return self._host

    # ------------------------------------------------------------------ telemetry
    def telemetry(self, sync: bool = False) -> Telemetry:
        """Current figures; `sync=True` waits for queued work first so every event is counted."""
        t = Telemetry(oom_retries=self._oom_retries, attach_seconds=self._attach_s, steps=self._step)
        t.kept_pinned_bytes = self.kept_pinned_bytes
        if not self.attached:
            return t
        plan = self.plan
        t.fixed_bytes, t.resident_bytes, t.streamed_bytes = (
            plan.fixed_bytes,
            plan.resident_bytes,
            plan.streamed_bytes,
        )
        t.ring_bytes = self._ring.nbytes if self._ring else 0
        f = self._fill
        t.pinned_bytes = f.pinned + f.reused + (self._stager.pinned_bytes if self._stager else 0)
        t.pageable_bytes, t.sourced_bytes, t.staging_bytes = f.pageable, f.sourced, f.staging
        t.reused_pinned_bytes, t.pin_seconds, t.pin_rate = f.reused, f.seconds, f.pin_rate
        w = self._whole_fill
        t.resident_pinned_bytes, t.resident_reused_pinned_bytes = w.pinned + w.reused, w.reused
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
