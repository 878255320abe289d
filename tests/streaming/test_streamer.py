"""Streamed forward == resident forward, ring reuse, parameter swapping, cancel, detach (CPU path)."""

import pytest
import torch

from weight_streaming import StreamingConfig, StreamingError, WeightStreamer
from weight_streaming.host import BlockLayout


def _block_bytes(model):
    return [BlockLayout.of(b, "b").nbytes for lst in (model.double_blocks, model.single_blocks) for b in lst]


def _budget_for(model, n_resident_blocks):
    """A budget that keeps about n blocks resident (fixed bytes + ring of 2 included)."""
    sizes = _block_bytes(model)
    fixed = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if "blocks" not in n)
    fixed += sum(b.numel() * b.element_size() for b in model.buffers())
    return fixed + 2 * max(sizes) + sum(sorted(sizes)[:n_resident_blocks])


@pytest.mark.parametrize("n_resident", [0, 3, 6])
@pytest.mark.parametrize("depth", [1, 2])
def test_streamed_output_is_bitwise_the_resident_output(tiny_pair, inputs, n_resident, depth):
    model, ref = tiny_pair(sizes=[24, 40, 8, 32, 16, 56, 8, 24, 48, 16])  # odd-sized blocks
    x = inputs()
    with torch.no_grad():
        want = ref(*x)
        cfg = StreamingConfig(vram_budget=_budget_for(model, n_resident), prefetch_depth=depth)
        with WeightStreamer(model, cfg, "cpu") as ws:
            assert len(ws.plan.streamed_indices) >= 10 - n_resident - 1
            for step in range(3):
                got = model(*x)
                assert torch.equal(got, want), f"step {step}"
            t = ws.telemetry()
            assert t.steps == 3 and t.streamed_blocks == len(ws.plan.streamed_indices)
            assert t.streamed_bytes == ws.plan.streamed_bytes > 0
            line = t.summary()
            assert line.startswith(f"{t.resident_blocks} resident / {t.streamed_blocks} streamed blocks")
            assert "GiB streamed" in line


def test_parameters_point_at_a_ring_slot_during_forward_and_at_host_memory_after(
    tiny_pair, inputs, fake_pins
):
    model, _ = tiny_pair()
    seen = []
    for i, b in enumerate(model.single_blocks):
        b.lin1.register_forward_pre_hook(lambda m, a, i=i: seen.append((i, m.weight.data_ptr())))
    cfg = StreamingConfig(vram_budget=0, pin_memory=True)
    with torch.no_grad(), WeightStreamer(model, cfg, "cpu") as ws:
        ring = [(s.buf.data_ptr(), s.buf.data_ptr() + s.buf.numel()) for s in ws.ring.slots]
        host_ptrs = {b.lin1.weight.data_ptr() for b in model.single_blocks}
        model(*inputs())
        model(*inputs())
        assert len(seen) == 2 * len(model.single_blocks)
        for _i, ptr in seen:
            assert any(lo <= ptr < hi for lo, hi in ring)
        # Back at the host buffers after the forward, and those are the streamer's own buffers.
        assert {b.lin1.weight.data_ptr() for b in model.single_blocks} == host_ptrs
        buffers = [(h.data.data_ptr(), h.data.data_ptr() + h.data.numel()) for h in ws.host_buffers]
        for ptr in host_ptrs:
            assert any(lo <= ptr < hi for lo, hi in buffers)
        # Consecutive streamed blocks alternate between the two slots.
        slots_used = [next(k for k, (lo, hi) in enumerate(ring) if lo <= p < hi) for _, p in seen]
        n = len(model.single_blocks)
        for step in (slots_used[:n], slots_used[n:]):
            assert all(a != b for a, b in zip(step, step[1:]))


def test_ring_is_fixed_and_each_step_copies_each_streamed_block_once(tiny_pair, inputs, monkeypatch):
    model, _ = tiny_pair()
    with torch.no_grad(), WeightStreamer(model, StreamingConfig(vram_budget=0), "cpu") as ws:
        ring_ptrs = [s.buf.data_ptr() for s in ws.ring.slots]
        assert len(ring_ptrs) == 2
        assert all(s.buf.numel() == max(_block_bytes(model)) for s in ws.ring.slots)
        copies = []
        orig = ws.scheduler._issue_copy
        monkeypatch.setattr(ws.scheduler, "_issue_copy", lambda j, slot: (copies.append(j), orig(j, slot)))
        m = len(ws.plan.streamed_indices)
        for _ in range(3):
            model(*inputs())
        # Static order, one block ahead, wrapping into the next step: exactly m copies a step.
        assert copies == list(range(1, m)) + [0] + (list(range(1, m)) + [0]) * 2
        assert [s.buf.data_ptr() for s in ws.ring.slots] == ring_ptrs


def test_out_of_order_and_skipped_blocks_stay_correct(tiny_pair, inputs):
    model, ref = tiny_pair(sizes=[24, 40, 8, 32, 16, 56, 8, 24, 48, 16])
    x = inputs(seed=3)
    with torch.no_grad(), WeightStreamer(model, StreamingConfig(vram_budget=_budget_for(model, 2)), "cpu"):
        for order in ([6, 5, 4, 3, 2, 1, 0], [0, 2, 4, 6], [3, 3, 1], None):
            model.order = ref.order = order
            assert torch.equal(model(*x), ref(*x)), order


def test_cancel_mid_forward_leaves_the_streamer_consistent(tiny_pair, inputs, cancelled_exc):
    model, ref = tiny_pair()
    x = inputs(seed=1)
    with torch.no_grad(), WeightStreamer(model, StreamingConfig(vram_budget=0), "cpu") as ws:
        host_ptrs = [p.data_ptr() for p in model.single_blocks.parameters()]
        model.fail_at = 4
        with pytest.raises(cancelled_exc):
            model(*x)
        model.fail_at = None
        assert [p.data_ptr() for p in model.single_blocks.parameters()] == host_ptrs
        assert not any(s.busy for s in ws.ring.slots)
        for _ in range(2):
            assert torch.equal(model(*x), ref(*x))


def test_fp8_weights_are_streamed_as_stored(tiny_pair, inputs):
    model, ref = tiny_pair(fp8=True)
    assert model.single_blocks[0].w8.dtype == torch.float8_e4m3fn
    with torch.no_grad(), WeightStreamer(model, StreamingConfig(vram_budget=0), "cpu"):
        assert model.single_blocks[0].w8.dtype == torch.float8_e4m3fn
        assert torch.equal(model(*inputs()), ref(*inputs()))


def test_inference_mode_forward(tiny_pair, inputs):
    model, ref = tiny_pair()
    with WeightStreamer(model, StreamingConfig(vram_budget=0), "cpu"), torch.inference_mode():
        assert torch.equal(model(*inputs()), ref(*inputs()))


@pytest.mark.parametrize("keep_pinned", [False, True])
def test_a_model_loaded_under_inference_mode_streams_detaches_and_runs_again(
    tiny_pair, inputs, fake_pins, keep_pinned
):
    """ComfyUI runs loaders under inference mode, so the parameters are inference tensors; the
    streamer points them at its own (ordinary) buffers and back, and every forward afterwards, in or
    out of inference mode, still runs (pointing such a parameter with ``.data =`` leaves it without
    a version counter: "Inference tensors do not track version counter")."""
    _, ref = tiny_pair()
    with torch.inference_mode():
        model, _ = tiny_pair()
    assert all(p.is_inference() for p in model.parameters())
    x = inputs()
    with torch.no_grad():
        want = ref(*x)
    cfg = StreamingConfig(vram_budget=0, pin_memory=True)
    ws = WeightStreamer(model, cfg, "cpu")
    for _ in range(2):  # the second attach reuses kept buffers when keep_pinned
        ws.attach()
        with torch.inference_mode():
            assert torch.equal(model(*x), want)
        ws.detach(keep_pinned=keep_pinned)
        with torch.inference_mode():
            assert torch.equal(model(*x), want)
        with torch.no_grad():
            assert torch.equal(model(*x), want)
    ws.release_pinned()
    with torch.inference_mode():
        assert torch.equal(model(*x), want)
    with torch.no_grad():
        assert torch.equal(model(*x), want)


def test_detach_restores_a_plain_model(tiny_pair, inputs):
    model, ref = tiny_pair()
    ws = WeightStreamer(model, StreamingConfig(vram_budget=_budget_for(model, 4)), "cpu")
    ws.attach()
    ws.detach()
    assert not any("forward" in b.__dict__ for b in model.single_blocks)
    assert not model._forward_pre_hooks
    assert ws.telemetry().streamed_bytes == 0
    with torch.no_grad():
        assert torch.equal(model(*inputs()), ref(*inputs()))


class DictSource:
    """A weight source backed by a state dict (stands in for a safetensors file)."""

    def __init__(self, sd):
        self.sd, self.reads = sd, []

    def read_into(self, name, out):
        self.reads.append(name)
        out.copy_(self.sd[name])


def test_weights_read_from_a_source_into_a_meta_model(tiny_pair, inputs, tiny_cls):
    _, ref = tiny_pair()
    with torch.device("meta"):
        torch.manual_seed(0)
        model = tiny_cls().eval()
    src = DictSource(ref.state_dict())
    with torch.no_grad(), WeightStreamer(model, StreamingConfig(vram_budget=0), "cpu", source=src):
        assert set(src.reads) == set(ref.state_dict())
        assert torch.equal(model(*inputs()), ref(*inputs()))


def test_models_without_declared_blocks_need_explicit_paths():
    seq = torch.nn.Sequential(torch.nn.Linear(4, 4))
    with pytest.raises(StreamingError, match="does not declare `streamable_blocks`"):
        WeightStreamer(seq, device="cpu").attach()

    class Enc(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = torch.nn.Module()
            self.model.layers = torch.nn.ModuleList(torch.nn.Linear(4, 4) for _ in range(3))

        def forward(self, x):
            for layer in self.model.layers:
                x = layer(x)
            return x

    enc, ref = Enc(), Enc()
    ref.load_state_dict(enc.state_dict())
    x = torch.randn(2, 4)
    with (
        torch.no_grad(),
        WeightStreamer(enc, StreamingConfig(vram_budget=0), "cpu", blocks=("model.layers",)),
    ):
        assert torch.equal(enc(x), ref(x))
    with pytest.raises(StreamingError, match="no attribute path"):
        WeightStreamer(enc, device="cpu", blocks=("model.blocks",)).attach()


def test_measured_block_times_drive_a_timed_plan_and_outputs_stay_exact(tiny_pair, inputs):
    from weight_streaming import measure_block_seconds

    model, ref = tiny_pair(sizes=[24, 40, 8, 32, 16, 56, 8, 24, 48, 16])
    x = inputs(seed=5)
    with torch.no_grad():
        secs = measure_block_seconds(model, lambda: model(*x))
        assert len(secs) == 10 and all(s > 0 for s in secs)
        # A link slow enough that copies matter: the planner models the steps and may deepen the ring.
        cfg = StreamingConfig(vram_budget=_budget_for(model, 3), block_seconds=secs, link_bandwidth=1e6)
        with WeightStreamer(model, cfg, "cpu") as ws:
            assert ws.plan.fits and ws.plan.streamed_indices
            assert len(ws.ring.slots) == ws.plan.ring_slots >= 2
            for _ in range(2):
                assert torch.equal(model(*x), ref(*x))
