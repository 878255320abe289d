"""The CUDA path: side-stream copies, events, real pinned memory (run on the lent GPU)."""

import pytest
import torch

from weight_streaming import StreamingConfig, WeightStreamer

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def _models(tiny_pair, **kw):
    model, ref = tiny_pair(
        d=256, n_double=4, n_single=12, sizes=[1024, 512, 1536, 768] + [1024, 2048] * 6, **kw
    )
    return model.to(torch.bfloat16), ref.to(torch.bfloat16).cuda()


def _inputs(inputs, seed=0):
    return [t.to("cuda", torch.bfloat16) for t in inputs(seed=seed, batch=2, n_img=512, n_txt=64)]


def _blocks_budget(model, n):
    sizes = sorted(
        sum(p.nbytes for p in b.parameters()) for b in [*model.double_blocks, *model.single_blocks]
    )
    fixed = sum(p.nbytes for n_, p in model.named_parameters() if "blocks" not in n_) + sum(
        b.nbytes for b in model.buffers()
    )
    return fixed + 2 * sizes[-1] + sum(sizes[:n]) + (1 << 16)


@pytest.mark.parametrize("depth", [1, 2])
def test_cuda_streamed_equals_resident_bit_for_bit(tiny_pair, inputs, depth):
    model, ref = _models(tiny_pair, fp8=True)
    x = _inputs(inputs)
    with torch.no_grad():
        want = ref(*x)
        cfg = StreamingConfig(vram_budget=_blocks_budget(model, 5), prefetch_depth=depth)
        with WeightStreamer(model, cfg, "cuda") as ws:
            assert ws.plan.streamed_indices and ws.plan.resident_indices
            for _ in range(4):
                assert torch.equal(model(*x), want)
            t = ws.telemetry(sync=True)
    assert t.streamed_bytes <= t.pinned_bytes <= 1.1 * t.streamed_bytes and t.pageable_bytes == 0
    assert t.copies >= 4 * t.streamed_blocks and t.copy_bandwidth > 1e9
    assert t.steps == 4 and t.last_step_stall_s >= 0.0
    assert all(p.device.type == "cpu" for p in model.parameters())  # detach brought it back


def test_cuda_host_buffers_are_page_locked_and_the_ring_never_reallocates(tiny_pair, inputs):
    model, _ = _models(tiny_pair)
    x = _inputs(inputs)
    with torch.no_grad(), WeightStreamer(model, StreamingConfig(vram_budget=0), "cuda") as ws:
        assert all(h.pinned and h.data.is_pinned() for h in ws.host_buffers)
        model(*x)
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        ring = [s.buf.data_ptr() for s in ws.ring.slots]
        for _ in range(3):
            out = model(*x)
        del out
        torch.cuda.synchronize()
        assert torch.cuda.memory_allocated() <= before  # no weight allocations left behind per step
        assert [s.buf.data_ptr() for s in ws.ring.slots] == ring


def test_cuda_cancel_mid_forward_then_forward_again(tiny_pair, inputs, cancelled_exc):
    model, ref = _models(tiny_pair)
    x = _inputs(inputs, seed=4)
    with (
        torch.no_grad(),
        WeightStreamer(model, StreamingConfig(vram_budget=_blocks_budget(model, 4)), "cuda") as ws,
    ):
        model.fail_at = 7
        with pytest.raises(cancelled_exc):
            model(*x)
        model.fail_at = None
        assert not any(s.busy for s in ws.ring.slots)
        assert all(
            p.device.type == "cpu"
            for b in ws.plan.streamed_indices
            for p in [*model.double_blocks, *model.single_blocks][b].parameters()
        )
        for _ in range(2):
            assert torch.equal(model(*x), ref(*x))


def test_cuda_auto_budget_uses_free_memory_less_activations_and_reserve(tiny_pair):
    model, _ = _models(tiny_pair)
    free, _ = torch.cuda.mem_get_info()
    want = _blocks_budget(model, 3)
    cfg = StreamingConfig(
        vram_budget="auto", activation_bytes=free - want - (64 << 20), reserve_bytes=64 << 20
    )
    with WeightStreamer(model, cfg, "cuda") as ws:
        assert ws.plan.budget <= want + (8 << 20)  # free memory moves a little (context, allocator)
        assert ws.plan.fits and ws.plan.streamed_indices
