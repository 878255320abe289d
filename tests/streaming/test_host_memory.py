"""Host memory on the CPU path: the pinned limit, keeping pinned buffers across a detach, the ledger
taking kept buffers back, blocks read from their source, progress (page-locking simulated)."""

import gc
import logging
import sys

import pytest
import torch

import weight_streaming.hostmem as hostmem
from weight_streaming import AttachProgress, StreamingConfig, WeightStreamer, set_external_pinned
from weight_streaming.host import BlockLayout

GiB = 1 << 30


def _sizes(model):
    return [BlockLayout.of(b, "b").nbytes for lst in (model.double_blocks, model.single_blocks) for b in lst]


def _budget_for(model, n_resident):
    sizes = _sizes(model)
    fixed = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if "blocks" not in n)
    fixed += sum(b.numel() * b.element_size() for b in model.buffers())
    return fixed + 2 * max(sizes) + sum(sorted(sizes)[:n_resident])


class DictSource:
    """A weight source backed by a state dict (stands in for a safetensors file); counts reads."""

    thread_safe = True

    def __init__(self, sd):
        self.sd, self.reads = sd, []

    def read_into(self, name, out):
        self.reads.append(name)
        out.copy_(self.sd[name])


def _meta_model(tiny_cls, **kw):
    with torch.device("meta"):
        return tiny_cls(**kw).eval()


# ------------------------------------------------------------------------------------ the limit
@pytest.mark.parametrize(
    ("ram_gib", "platform", "want_gib"),
    [
        (64, "linux", 64 * 0.9),  # 90% of RAM is less than RAM - 4 GiB
        (16, "linux", 16 - 4),  # RAM - 4 GiB is less than 90%
        (32, "win32", 32 * 0.4),
        (3, "linux", 0),
        (64, "darwin", 64 * 0.9),
    ],
)
def test_default_pinned_limit_follows_comfyuis_rule(ram_gib, platform, want_gib):
    got = hostmem.default_pinned_limit(ram_gib * GiB, platform)
    assert got == pytest.approx(want_gib * GiB, abs=1)


def test_cgroup_memory_limit_takes_the_smallest_limit_on_the_path(tmp_path):
    root = tmp_path / "cg"
    (root / "a" / "b").mkdir(parents=True)
    (root / "memory.max").write_text("max\n")
    (root / "a" / "memory.max").write_text(str(12 * GiB))
    (root / "a" / "b" / "memory.max").write_text(str(20 * GiB))
    me = tmp_path / "self"
    me.write_text("0::/a/b\n")
    assert hostmem.cgroup_memory_limit(root, me) == 12 * GiB
    (root / "a" / "memory.max").write_text("max")
    assert hostmem.cgroup_memory_limit(root, me) == 20 * GiB
    (root / "a" / "b" / "memory.max").write_text("max")
    assert hostmem.cgroup_memory_limit(root, me) is None
    (root / "memory").mkdir()
    (root / "memory" / "memory.limit_in_bytes").write_text(str(6 * GiB))  # cgroup v1
    assert hostmem.cgroup_memory_limit(root, me) == 6 * GiB


def test_host_ram_is_positive_and_the_ledger_defaults_to_its_rule(fresh_ledger):
    ram = hostmem.host_ram_bytes()
    assert 0 < ram <= hostmem._physical_ram()
    assert fresh_ledger.limit() == hostmem.default_pinned_limit(ram)


def test_the_process_limit_is_never_exceeded_across_streamers(
    tiny_pair, inputs, fake_pins, fresh_ledger, caplog
):
    a, ref = tiny_pair()
    b, _ = tiny_pair()
    streamed = sum(_sizes(a))
    limit = int(streamed * 1.3)  # room for one model's streamed blocks and a third of the other's
    hostmem.set_pinned_limit(limit)
    cfg = StreamingConfig(vram_budget=0, pin_memory=True)
    with torch.no_grad(), caplog.at_level(logging.WARNING, logger="weight_streaming"):
        wa, wb = WeightStreamer(a, cfg, "cpu"), WeightStreamer(b, cfg, "cpu")
        wa.attach()
        wb.attach()
        ta, tb = wa.telemetry(), wb.telemetry()
        assert ta.pinned_bytes == streamed and ta.pageable_bytes == 0
        assert 0 < tb.pinned_bytes <= limit - streamed and tb.pageable_bytes == streamed - tb.pinned_bytes
        assert fake_pins.peak <= limit and hostmem.pinned_in_use() == fresh_ledger.used <= limit
        assert torch.equal(a(*inputs()), ref(*inputs())) and torch.equal(b(*inputs()), ref(*inputs()))
        wa.detach()
        wb.detach()
    assert fresh_ledger.used == 0 and not fake_pins.registered
    assert caplog.text.count("pinned-memory limit reached") == 1


def test_bytes_pinned_outside_weight_streaming_count_against_the_limit(tiny_pair, fake_pins, fresh_ledger):
    model, _ = tiny_pair()
    streamed = sum(_sizes(model))
    hostmem.set_pinned_limit(streamed)
    set_external_pinned(lambda: streamed // 2)  # e.g. what the host application pinned itself
    try:
        with WeightStreamer(model, StreamingConfig(vram_budget=0, pin_memory=True), "cpu") as ws:
            t = ws.telemetry()
            assert 0 < t.pinned_bytes <= streamed // 2 and t.pinned_bytes + t.pageable_bytes == streamed
    finally:
        set_external_pinned(None)


def test_a_zero_limit_pins_nothing(tiny_pair, inputs, fake_pins):
    model, ref = tiny_pair()
    hostmem.set_pinned_limit(0)
    with torch.no_grad(), WeightStreamer(model, StreamingConfig(vram_budget=0, pin_memory=True), "cpu") as ws:
        assert ws.telemetry().pinned_bytes == 0 and fake_pins.calls == 0
        assert torch.equal(model(*inputs()), ref(*inputs()))


# ------------------------------------------------------------------- keeping pinned buffers
def test_detach_keeping_pinned_buffers_then_reattach_does_not_pin_again(
    tiny_pair, inputs, fake_pins, fresh_ledger
):
    model, ref = tiny_pair()
    x = inputs(seed=2)
    cfg = StreamingConfig(vram_budget=_budget_for(model, 3), pin_memory=True)
    ws = WeightStreamer(model, cfg, "cpu")
    with torch.no_grad():
        ws.attach()
        first = ws.telemetry()
        ptrs = [h.data.data_ptr() for h in ws.host_buffers]
        assert torch.equal(model(*x), ref(*x))
        ws.detach(keep_pinned=True)
        # Detached: the model runs from the kept buffers, which stay page-locked and counted.
        assert not ws.attached and ws.kept_pinned_bytes == first.pinned_bytes > 0
        assert fresh_ledger.used == first.pinned_bytes and fake_pins.bytes == first.pinned_bytes
        assert ws.telemetry().kept_pinned_bytes == first.pinned_bytes
        assert torch.equal(model(*x), ref(*x))
        calls = fake_pins.calls
        ws.attach()
        again = ws.telemetry()
        assert fake_pins.calls == calls  # nothing pinned again
        assert again.reused_pinned_bytes == again.pinned_bytes == first.pinned_bytes
        assert [h.data.data_ptr() for h in ws.host_buffers] == ptrs
        for _ in range(2):
            assert torch.equal(model(*x), ref(*x))
        ws.detach()  # a full detach releases them
    assert fresh_ledger.used == 0 and not fake_pins.registered and ws.kept_pinned_bytes == 0
    with torch.no_grad():
        assert torch.equal(model(*x), ref(*x))


def test_release_kept_pinned_frees_every_detached_streamers_buffers(tiny_pair, fake_pins, fresh_ledger):
    from weight_streaming import release_kept_pinned

    a, _ = tiny_pair()
    b, _ = tiny_pair()
    cfg = StreamingConfig(vram_budget=0, pin_memory=True)
    wa, wb = WeightStreamer(a, cfg, "cpu"), WeightStreamer(b, cfg, "cpu")
    wa.attach()
    wb.attach()
    kept = wa.telemetry().pinned_bytes
    wa.detach(keep_pinned=True)
    assert release_kept_pinned() == kept  # b is attached: its buffers are in use and stay
    assert wa.kept_pinned_bytes == 0 and fresh_ledger.used == wb.telemetry().pinned_bytes > 0
    wb.detach()
    assert fresh_ledger.used == 0 and not fake_pins.registered


def test_release_pinned_gives_kept_buffers_back(tiny_pair, inputs, fake_pins, fresh_ledger):
    model, ref = tiny_pair()
    ws = WeightStreamer(model, StreamingConfig(vram_budget=0, pin_memory=True), "cpu")
    ws.attach()
    pinned = ws.telemetry().pinned_bytes
    assert ws.release_pinned() == 0  # attached: buffers in use are not released here
    ws.detach(keep_pinned=True)
    assert ws.release_pinned() == pinned and ws.kept_pinned_bytes == 0
    assert fresh_ledger.used == 0 and not fake_pins.registered
    with torch.no_grad():
        assert torch.equal(model(*inputs()), ref(*inputs()))
    ws.attach()  # pins again from the bytes the parameters kept
    assert ws.telemetry().pinned_bytes == pinned and ws.telemetry().reused_pinned_bytes == 0
    ws.detach()


def test_a_new_plan_after_keeping_reuses_still_streamed_blocks_and_unpins_resident_ones(
    tiny_pair, inputs, fake_pins, fresh_ledger
):
    model, ref = tiny_pair(sizes=[24, 40, 8, 32, 16, 56, 8, 24, 48, 16])
    x = inputs(seed=7)
    ws = WeightStreamer(model, StreamingConfig(vram_budget=_budget_for(model, 2), pin_memory=True), "cpu")
    with torch.no_grad():
        ws.attach()
        streamed_before = set(ws.plan.streamed_indices)
        ws.detach(keep_pinned=True)
        ws.config = StreamingConfig(vram_budget=_budget_for(model, 6), pin_memory=True)  # more VRAM
        calls = fake_pins.calls
        ws.attach()
        now = set(ws.plan.streamed_indices)
        t = ws.telemetry()
        sizes = ws.plan.block_sizes
        assert len(now) < len(streamed_before) and now & streamed_before
        # Blocks still streamed reuse their kept buffers; only newly streamed ones are pinned.
        assert t.reused_pinned_bytes == sum(sizes[i] for i in now & streamed_before)
        assert fake_pins.calls - calls == len(now - streamed_before)
        assert t.pinned_bytes == t.streamed_bytes == fresh_ledger.used  # resident ones were unpinned
        assert torch.equal(model(*x), ref(*x))
        ws.detach()
    assert fresh_ledger.used == 0 and not fake_pins.registered


def test_the_ledger_takes_kept_buffers_back_when_another_model_needs_them(
    tiny_pair, inputs, fake_pins, fresh_ledger, caplog
):
    a, ref = tiny_pair()
    b, _ = tiny_pair()
    hostmem.set_pinned_limit(sum(_sizes(a)))  # one model's streamed blocks at a time
    cfg = StreamingConfig(vram_budget=0, pin_memory=True)
    wa, wb = WeightStreamer(a, cfg, "cpu"), WeightStreamer(b, cfg, "cpu")
    with torch.no_grad(), caplog.at_level(logging.INFO, logger="weight_streaming"):
        wa.attach()
        wa.detach(keep_pinned=True)
        assert wa.kept_pinned_bytes > 0
        wb.attach()
        assert wa.kept_pinned_bytes == 0 and wb.telemetry().pageable_bytes == 0  # b got all of it
        assert "took back" in caplog.text
        assert torch.equal(a(*inputs()), ref(*inputs()))  # a still runs from ordinary memory
        wb.detach(keep_pinned=True)
        wa.attach()  # and now a takes it back from b
        assert wb.kept_pinned_bytes == 0 and wa.telemetry().pageable_bytes == 0
        assert torch.equal(a(*inputs()), ref(*inputs()))
        wa.detach()
    assert fresh_ledger.used == 0 and not fake_pins.registered


def test_oom_relief_reuses_the_kept_pinned_buffers(tiny_pair, inputs, fake_pins, fresh_ledger):
    model, ref = tiny_pair(sizes=[24, 40, 8, 32, 16, 56, 8, 24, 48, 16])
    x = inputs(seed=9)
    ws = WeightStreamer(model, StreamingConfig(vram_budget=_budget_for(model, 7), pin_memory=True), "cpu")
    ws.attach()
    calls_before = fake_pins.calls
    plans = []

    def step():
        plans.append(set(ws.plan.streamed_indices))
        if len(ws.plan.resident_indices) > 3:  # activations only fit with at most 3 blocks resident
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        with torch.no_grad():
            return model(*x)

    assert torch.equal(ws.call(step), ref(*x).detach())
    t = ws.telemetry()
    assert len(plans) >= 2 and t.oom_retries == len(plans) - 1
    # At each re-attach only blocks that were not streamed just before are pinned; the others reuse
    # the buffers kept by the relief's detach.
    assert fake_pins.calls - calls_before == sum(len(b - a) for a, b in zip(plans, plans[1:]))
    sizes = ws.plan.block_sizes
    assert t.reused_pinned_bytes == sum(sizes[i] for i in plans[-1] & plans[-2]) > 0
    assert t.pinned_bytes == t.streamed_bytes == fresh_ledger.used
    ws.detach()
    assert fresh_ledger.used == 0 and not fake_pins.registered


# ------------------------------------------------------------------------------ from the source
def test_blocks_past_the_limit_are_read_from_the_source_each_step(
    tiny_pair, inputs, tiny_cls, fake_pins, caplog
):
    _, ref = tiny_pair()
    torch.manual_seed(0)
    model = _meta_model(tiny_cls)
    src = DictSource(ref.state_dict())
    x = inputs(seed=4)
    hostmem.set_pinned_limit(sum(_sizes(ref)) // 3)
    cfg = StreamingConfig(vram_budget=0, pin_memory=True)
    with torch.no_grad(), caplog.at_level(logging.WARNING, logger="weight_streaming"):
        with WeightStreamer(model, cfg, "cpu", source=src) as ws:
            t = ws.telemetry()
            assert t.sourced_bytes > 0 and t.pinned_bytes > 0 and t.pageable_bytes == 0
            assert t.staging_bytes > 0
            sourced = [h for h in ws.host_buffers if h.kind == "sourced"]
            # No host copy: outside the forward their parameters are zero-stride placeholders.
            for h in sourced:
                assert all(v.untyped_storage().nbytes() <= 8 for v in h.views)
            names = {n for n, _ in model.named_parameters()}
            reads = len(src.reads)
            for step in range(3):
                assert torch.equal(model(*x), ref(*x)), step
            # Each sourced block is read once a step (give or take the one block read ahead).
            n_params = sum(len(h.views) for h in sourced)
            assert abs(len(src.reads) - reads - 3 * n_params) <= max(len(h.views) for h in sourced)
            model.order = ref.order = [6, 2, 2, 0]  # out of order, repeated
            assert torch.equal(model(*x), ref(*x))
            model.order = ref.order = None
            assert torch.equal(model(*x), ref(*x))
    assert "read from the weight file each step" in caplog.text
    # Detached: back on the meta device, so no host copy outlives the run.
    assert {p.device.type for n, p in model.named_parameters() if n in names} == {"meta"}
    assert not fake_pins.registered


def test_without_pinning_a_source_model_gets_ordinary_copies_while_ram_allows(
    tiny_pair, inputs, tiny_cls, monkeypatch
):
    _, ref = tiny_pair()
    src = DictSource(ref.state_dict())
    model = _meta_model(tiny_cls)
    with torch.no_grad(), WeightStreamer(model, StreamingConfig(vram_budget=0), "cpu", source=src) as ws:
        t = ws.telemetry()
        assert t.pageable_bytes == t.streamed_bytes and t.sourced_bytes == 0
        reads = len(src.reads)
        assert torch.equal(model(*inputs()), ref(*inputs()))
        assert len(src.reads) == reads  # read once, at attach
    monkeypatch.setattr(hostmem, "default_pinned_limit", lambda *a: sum(_sizes(ref)) // 2)
    model = _meta_model(tiny_cls)
    with torch.no_grad(), WeightStreamer(model, StreamingConfig(vram_budget=0), "cpu", source=src) as ws:
        t = ws.telemetry()
        assert 0 < t.pageable_bytes <= sum(_sizes(ref)) // 2 and t.sourced_bytes > 0
        assert torch.equal(model(*inputs()), ref(*inputs()))


def test_parallel_reads_from_a_thread_safe_source_give_the_same_model(tiny_pair, inputs, tiny_cls, fake_pins):
    _, ref = tiny_pair()
    src = DictSource(ref.state_dict())
    model = _meta_model(tiny_cls)
    cfg = StreamingConfig(vram_budget=_budget_for(ref, 2), pin_memory=True, pin_threads=3)
    with torch.no_grad(), WeightStreamer(model, cfg, "cpu", source=src) as ws:
        assert ws.telemetry().pinned_bytes == ws.telemetry().streamed_bytes
        assert torch.equal(model(*inputs()), ref(*inputs()))
    assert {p.device.type for p in model.parameters()} == {"meta"}  # full detach frees host copies


# ------------------------------------------------------------------------------------ progress
def test_progress_reports_bytes_placed_and_pinned_of_the_total(tiny_pair, fake_pins):
    model, _ = tiny_pair()
    seen: list[AttachProgress] = []
    ws = WeightStreamer(
        model,
        StreamingConfig(vram_budget=_budget_for(model, 4), pin_memory=True),
        "cpu",
        progress=seen.append,
    )
    ws.attach()
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    total += sum(b.numel() * b.element_size() for b in model.buffers())
    stages = [p.stage for p in seen]
    assert {"placing", "pinning"} <= set(stages) and stages[-1] == "done"
    assert stages.index("pinning") > max(i for i, s in enumerate(stages) if s == "placing")
    assert all(a.done <= b.done for a, b in zip(seen, seen[1:]))
    assert seen[-1].done == seen[-1].total and seen[0].total == seen[-1].total
    fixed = total - sum(s.param_bytes for s in ws._layouts)
    assert seen[-1].total == fixed + ws.plan.resident_bytes + ws.plan.streamed_bytes
    ws.detach(keep_pinned=True)
    seen.clear()
    ws.attach()  # kept buffers need no work: only the placing is counted
    assert seen[-1].total == seen[-1].done == fixed + ws.plan.resident_bytes
    ws.detach()
    assert AttachProgress("pinning", 41 * GiB, 53 * GiB).text() == "pinning 41.0 of 53.0 GiB"


def test_a_progress_callback_that_raises_cancels_the_attach_cleanly(
    tiny_pair, inputs, fake_pins, fresh_ledger
):
    model, ref = tiny_pair()

    class Stop(Exception):
        pass

    for stage in ("placing", "pinning"):

        def cancel(p, stage=stage):
            if p.stage == stage:
                raise Stop(stage)

        ws = WeightStreamer(model, StreamingConfig(vram_budget=_budget_for(model, 3), pin_memory=True), "cpu")
        with pytest.raises(Stop):
            ws.attach(progress=cancel)
        assert not ws.attached and not model._forward_pre_hooks
        gc.collect()
        assert fresh_ledger.used == 0 and not fake_pins.registered, stage
        with torch.no_grad():
            assert torch.equal(model(*inputs()), ref(*inputs()))


# --------------------------------------------------------------------------------- allocation
@pytest.mark.parametrize("nbytes", [1000, (2 << 20) + 12345, 9 << 20])
def test_host_buffers_are_usable_and_huge_page_aligned_on_linux(nbytes):
    t = hostmem.alloc_host(nbytes)
    assert t.dtype == torch.uint8 and t.numel() == nbytes and t.is_contiguous()
    t.fill_(7)
    view = t[-16:]
    del t
    gc.collect()
    assert int(view.sum()) == 7 * 16  # the mapping lives as long as a view does
    if sys.platform.startswith("linux") and nbytes >= hostmem.HUGE_PAGE:
        assert hostmem.alloc_host(nbytes).data_ptr() % hostmem.HUGE_PAGE == 0
