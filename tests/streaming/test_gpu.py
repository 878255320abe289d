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


def test_cuda_kept_pinned_buffers_survive_detach_and_are_reused(tiny_pair, inputs):
    import weight_streaming.hostmem as hostmem

    model, ref = _models(tiny_pair, fp8=True)
    x = _inputs(inputs, seed=2)
    ws = WeightStreamer(model, StreamingConfig(vram_budget=_blocks_budget(model, 4)), "cuda")
    with torch.no_grad():
        want = ref(*x)
        ws.attach()
        ptrs = [h.data.data_ptr() for h in ws.host_buffers]
        blocks = [*model.double_blocks, *model.single_blocks]
        streamed = [p for i in ws.plan.streamed_indices for p in blocks[i].parameters()]
        assert torch.equal(model(*x), want)
        ws.detach(keep_pinned=True)
        assert all(p.device.type == "cpu" for p in model.parameters())
        assert ws.kept_pinned_bytes > 0 and all(p.is_pinned() for p in streamed)
        ws.attach()
        t = ws.telemetry(sync=True)
        assert t.reused_pinned_bytes == t.pinned_bytes == t.streamed_bytes > 0
        assert [h.data.data_ptr() for h in ws.host_buffers] == ptrs
        assert all(h.pinned and h.data.is_pinned() for h in ws.host_buffers)
        for _ in range(2):
            assert torch.equal(model(*x), want)
        ws.detach()
    assert hostmem.LEDGER.used == 0


def test_cuda_blocks_past_the_limit_stream_in_place_and_from_a_source_exactly(tiny_pair, inputs, tiny_cls):
    import weight_streaming.hostmem as hostmem

    model, ref = _models(tiny_pair)
    x = _inputs(inputs, seed=3)
    streamed = sum(p.nbytes for b in [*model.double_blocks, *model.single_blocks] for p in b.parameters())
    old = hostmem.LEDGER._limit
    hostmem.set_pinned_limit(streamed // 3)
    try:
        with torch.no_grad():
            want = ref(*x)
            with WeightStreamer(model, StreamingConfig(vram_budget=_blocks_budget(model, 2)), "cuda") as ws:
                t = ws.telemetry()
                assert t.pinned_bytes > 0 and t.pageable_bytes > 0
                for _ in range(3):
                    assert torch.equal(model(*x), want)

            class Source:
                thread_safe = True

                def __init__(self, sd):
                    self.sd = sd

                def read_into(self, name, out):
                    out.copy_(self.sd[name])

            sd = {k: v.detach().cpu() for k, v in ref.state_dict().items()}
            with torch.device("meta"):
                meta = tiny_cls(
                    d=256, n_double=4, n_single=12, sizes=[1024, 512, 1536, 768] + [1024, 2048] * 6
                )
            meta = meta.to(torch.bfloat16).eval()
            cfg = StreamingConfig(vram_budget=_blocks_budget(model, 2))
            with WeightStreamer(meta, cfg, "cuda", source=Source(sd)) as ws:
                t = ws.telemetry()
                assert t.sourced_bytes > 0 and t.staging_bytes > 0
                for _ in range(3):
                    assert torch.equal(meta(*x), want)
    finally:
        hostmem.set_pinned_limit(old)
    assert hostmem.LEDGER.used == 0


def test_cuda_huge_page_host_buffers_page_lock(tiny_pair):
    import weight_streaming.hostmem as hostmem

    t = hostmem.alloc_host(64 << 20)
    hostmem.register(t)
    try:
        assert t.is_pinned()
        dev = torch.empty(t.numel(), dtype=torch.uint8, device="cuda")
        t.fill_(5)
        dev.copy_(t, non_blocking=True)
        torch.cuda.synchronize()
        assert int(dev[-1]) == 5
    finally:
        hostmem.unregister(t)
