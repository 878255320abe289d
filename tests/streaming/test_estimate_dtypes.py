"""The planner's compute estimate uses the rate of the dtype each block really computes in (an FP8
probe for float8 blocks where the GPU has FP8 tensor cores) and the block bytes as stored (CPU)."""

import pytest
import torch
from torch import nn

from weight_streaming import StreamingConfig, WeightStreamer
from weight_streaming import estimate as est
from weight_streaming.host import ALIGN


class Float8Linear(nn.Module):
    """A quantized linear as the quant layers look to the streamer: in/out features, float8 weight
    parameter, fp32 scale buffer, dequantizing forward."""

    def __init__(self, d_in: int, d_out: int, g: torch.Generator) -> None:
        super().__init__()
        self.in_features, self.out_features = d_in, d_out
        w = torch.randn(d_out, d_in, generator=g) * 0.1
        self.weight = nn.Parameter(w.to(torch.float8_e4m3fn), requires_grad=False)
        self.register_buffer("weight_scale", torch.tensor(1.0))

    def forward(self, x):
        return x @ (self.weight.to(x.dtype) * self.weight_scale.to(x.dtype)).t()


class PackedLinear(nn.Module):
    """Packed integer weights (GGUF-like): uint8 bytes, dequantized to the activation dtype."""

    def __init__(self, d_in: int, d_out: int) -> None:
        super().__init__()
        self.in_features, self.out_features = d_in, d_out
        self.weight = nn.Parameter(torch.zeros(d_out, d_in // 2, dtype=torch.uint8), requires_grad=False)


class Block(nn.Module):
    def __init__(self, d: int, kind: str, g: torch.Generator) -> None:
        super().__init__()
        make = {
            "bf16": lambda a, b: nn.Linear(a, b, bias=False, dtype=torch.bfloat16),
            "fp8": lambda a, b: Float8Linear(a, b, g),
        }[kind]
        self.up, self.down = make(d, 4 * d), make(4 * d, d)
        self.norm = nn.Parameter(torch.ones(d, dtype=torch.bfloat16))  # small, in the activation dtype

    def forward(self, x):
        return x + self.down(torch.nn.functional.silu(self.up(x))) * self.norm


class Stack(nn.Module):
    streamable_blocks = ("blocks",)

    def __init__(self, kinds: list[str], d: int = 32) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.inp = nn.Linear(d, d, bias=False, dtype=torch.bfloat16)
        self.blocks = nn.ModuleList(Block(d, k, g) for k in kinds)

    def forward(self, x):
        x = self.inp(x)
        for b in self.blocks:
            x = b(x)
        return x


def test_block_matmul_dtype_follows_the_weights_and_the_device(monkeypatch):
    g = torch.Generator().manual_seed(0)
    bf16, fp8 = Block(16, "bf16", g), Block(16, "fp8", g)
    assert est.block_matmul_dtype(bf16, "cpu", torch.bfloat16) == torch.bfloat16
    # No FP8 tensor cores (CPU here, or an RTX 3090): float8 weights are dequantized first.
    assert est.block_matmul_dtype(fp8, "cpu", torch.bfloat16) == torch.bfloat16
    monkeypatch.setattr(est, "fp8_matmul_supported", lambda device: True)
    assert est.block_matmul_dtype(fp8, "cpu", torch.bfloat16) == torch.float8_e4m3fn
    assert est.block_matmul_dtype(bf16, "cpu", torch.bfloat16) == torch.bfloat16
    packed = nn.Sequential(PackedLinear(16, 64), PackedLinear(64, 16))
    assert est.block_matmul_dtype(packed, "cpu", torch.float16) == torch.float16
    # A layer may say what it computes in (e.g. a float8 layer without an input scale).
    fp8.up.matmul_dtype = torch.bfloat16
    fp8.down.matmul_dtype = lambda device: torch.bfloat16
    assert est.block_matmul_dtype(fp8, "cpu", torch.bfloat16) == torch.bfloat16


def test_mixed_block_votes_by_weight_count(monkeypatch):
    monkeypatch.setattr(est, "fp8_matmul_supported", lambda device: True)
    g = torch.Generator().manual_seed(0)
    block = nn.Sequential(Float8Linear(64, 256, g), nn.Linear(64, 16, dtype=torch.bfloat16))
    assert est.block_matmul_dtype(block, "cpu", torch.bfloat16) == torch.float8_e4m3fn
    block = nn.Sequential(Float8Linear(8, 16, g), nn.Linear(64, 256, dtype=torch.bfloat16))
    assert est.block_matmul_dtype(block, "cpu", torch.bfloat16) == torch.bfloat16


def test_fp8_probe_runs_scaled_mm_and_is_cached_apart_from_bf16(monkeypatch):
    est.clear_probe_cache()
    calls = []
    real = torch._scaled_mm
    monkeypatch.setattr(torch, "_scaled_mm", lambda *a, **k: calls.append(k["out_dtype"]) or real(*a, **k))
    rate = est.measure_matmul_flops("cpu", torch.float8_e4m3fn, n=32, iters=2)
    assert rate > 0 and calls == [torch.bfloat16] * 3  # warm-up + 2 timed, bf16 output as FP8 layers
    assert est.measure_matmul_flops("cpu", torch.float8_e4m3fn, n=32) == rate and len(calls) == 3
    est.measure_matmul_flops("cpu", torch.bfloat16, n=32, iters=1)
    assert len(calls) == 3  # the bf16 probe is a plain matmul, probed on its own
    est.clear_probe_cache()


def test_estimate_uses_each_blocks_rate_and_probes_each_dtype_once(monkeypatch):
    monkeypatch.setattr(est, "fp8_matmul_supported", lambda device: True)
    model = Stack(["bf16", "fp8", "fp8", "bf16"])
    probed = []
    rates = {torch.bfloat16: 1e9, torch.float8_e4m3fn: 2e9}

    def probe(device, dtype):
        probed.append(dtype)
        return rates[dtype]

    secs = est.estimate_blocks_seconds(list(model.blocks), [4e6] * 4, "cpu", torch.bfloat16, 0.5, probe=probe)
    assert secs == pytest.approx((8e-3, 4e-3, 4e-3, 8e-3))
    assert sorted(probed, key=str) == sorted([torch.bfloat16, torch.float8_e4m3fn], key=str)
    one = est.estimate_blocks_seconds(
        list(model.blocks), [4e6] * 4, "cpu", torch.bfloat16, 1.0, 1e9, probe=probe
    )
    assert one == pytest.approx((4e-3,) * 4) and len(probed) == 2  # a given rate: no probe
    with pytest.raises(ValueError, match="FLOP counts"):
        est.estimate_blocks_seconds(list(model.blocks), [1.0], "cpu", torch.bfloat16)


def test_streamer_plans_fp8_blocks_at_the_fp8_rate_and_their_stored_bytes(monkeypatch):
    monkeypatch.setattr(est, "fp8_matmul_supported", lambda device: True)
    kinds = ["bf16", "fp8", "fp8", "bf16", "fp8"]
    model = Stack(kinds)
    probed = []

    def probe(device, dtype=torch.bfloat16, n=None, iters=5):
        probed.append(dtype)
        return {torch.bfloat16: 1e9, torch.float8_e4m3fn: 1.8e9}[dtype]

    monkeypatch.setattr("weight_streaming.streamer.measure_matmul_flops", probe)
    d = 32

    def stored(kind: str) -> int:
        # Each parameter starts aligned inside the block buffer; float8 weights take one byte each.
        per = 1 if kind == "fp8" else 2
        return sum(-(-p // ALIGN) * ALIGN for p in (d * 2, 4 * d * d * per, 4 * d * d * per))

    sizes = [stored(k) for k in kinds]
    budget = d * d * 2 + 2 * max(sizes) + min(sizes)  # fixed input layer, a ring of two, one more block
    cfg = StreamingConfig(
        vram_budget=budget, block_flops=(1e6,) * 5, flops_efficiency=1.0, link_bandwidth=1e6
    )
    x = torch.randn(2, 3, d, dtype=torch.bfloat16)
    with torch.no_grad():
        ref = model(x)
        with WeightStreamer(model, cfg, "cpu") as ws:
            assert list(ws.plan.block_sizes) == sizes
            want = tuple(1e-3 if k == "bf16" else 1e-3 / 1.8 for k in kinds)
            assert ws.timing.block_seconds == pytest.approx(want)
            assert set(probed) == {torch.bfloat16, torch.float8_e4m3fn} and len(probed) == 2
            assert ws.plan.streamed_indices
            assert torch.equal(model(x), ref)
