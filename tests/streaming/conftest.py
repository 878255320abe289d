"""Tiny models for the streaming tests (random weights, a few KB each)."""

import pytest
import torch
from torch import nn

import weight_streaming.hostmem as hostmem


class DoubleBlock(nn.Module):
    """Two streams, like a FLUX double block: (x, c) -> (x', c'), with a shared modulation argument."""

    def __init__(self, d: int, hidden: int) -> None:
        super().__init__()
        self.img_mlp_in = nn.Linear(d, hidden, bias=False)
        self.img_mlp_out = nn.Linear(hidden, d, bias=True)
        self.txt_mlp = nn.Linear(d, d, bias=False)
        self.norm_scale = nn.Parameter(torch.randn(d))

    def forward(self, x, c, mod):
        h = torch.nn.functional.silu(self.img_mlp_in(x * (1 + mod)))
        x = x + self.img_mlp_out(h) * self.norm_scale
        c = c + self.txt_mlp(c)
        return x, c


class SingleBlock(nn.Module):
    def __init__(self, d: int, hidden: int, fp8: bool = False) -> None:
        super().__init__()
        self.lin1 = nn.Linear(d, hidden, bias=False)
        self.lin2 = nn.Linear(hidden, d, bias=False)
        self.fp8 = fp8
        if fp8:
            # Weight stored in FP8 with a per-tensor scale (dequantised inside the block).
            w = torch.randn(d, d) * 0.1
            self.w8 = nn.Parameter(w.to(torch.float8_e4m3fn), requires_grad=False)
            self.w8_scale = nn.Parameter(torch.tensor(0.5))

    def forward(self, x, mod):
        y = self.lin2(torch.tanh(self.lin1(x + mod)))
        if self.fp8:
            y = y + (x @ (self.w8.to(x.dtype) * self.w8_scale).t()).tanh()
        return x + y


class TinyDiT(nn.Module):
    """Non-block params in/out/mod, a buffer, double then single blocks of uneven sizes."""

    streamable_blocks = ("double_blocks", "single_blocks")

    def __init__(self, d=16, n_double=3, n_single=7, fp8=False, sizes=None) -> None:
        super().__init__()
        self.img_in = nn.Linear(8, d)
        self.txt_in = nn.Linear(8, d)
        self.mod = nn.Linear(1, d)
        self.out = nn.Linear(d, 8)
        self.register_buffer("offset", torch.linspace(-1, 1, d))
        sizes = sizes or [32] * (n_double + n_single)
        self.double_blocks = nn.ModuleList(DoubleBlock(d, sizes[i]) for i in range(n_double))
        self.single_blocks = nn.ModuleList(
            SingleBlock(d, sizes[n_double + i], fp8=fp8 and i % 2 == 0) for i in range(n_single)
        )
        self.order = None  # optional execution order over single blocks (out-of-order tests)
        self.fail_at = None  # raise inside this single block (cancel tests)

    def forward(self, img, txt, t):
        mod = self.mod(t[:, None])[:, None, :]
        x = self.img_in(img) + self.offset
        c = self.txt_in(txt)
        for b in self.double_blocks:
            x, c = b(x, c, mod)
        x = torch.cat([c, x], dim=1)
        order = self.order if self.order is not None else range(len(self.single_blocks))
        for i in order:
            if self.fail_at == i:
                self.single_blocks[i].lin1.register_forward_hook(_raise_once)
            x = self.single_blocks[i](x, mod)
        return self.out(x[:, c.shape[1] :])


class Cancelled(Exception):
    pass


def _raise_once(module, args, out):
    module._forward_hooks.clear()
    raise Cancelled("stop requested")


def make_inputs(seed=0, batch=2, n_img=5, n_txt=3):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(batch, n_img, 8, generator=g),
        torch.randn(batch, n_txt, 8, generator=g),
        torch.rand(batch, generator=g),
    )


@pytest.fixture
def tiny_pair():
    """(model, reference): two TinyDiTs with identical random weights."""

    def make(**kw):
        torch.manual_seed(0)
        a = TinyDiT(**kw)
        torch.manual_seed(0)
        b = TinyDiT(**kw)
        return a.eval(), b.eval()

    return make


@pytest.fixture
def inputs():
    return make_inputs


@pytest.fixture
def cancelled_exc():
    return Cancelled


@pytest.fixture
def tiny_cls():
    return TinyDiT


class FakePinning:
    """Pretends to page-lock memory (no CUDA here): records registered pointers; optionally fails."""

    def __init__(self, fail=False):
        self.fail, self.registered, self.calls, self.peak = fail, {}, 0, 0

    def register(self, t):
        self.calls += 1
        if self.fail:
            raise RuntimeError("cudaHostRegister failed with CUDA error 2 (simulated)")
        assert t.data_ptr() not in self.registered, "registered twice"
        self.registered[t.data_ptr()] = t.numel() * t.element_size()
        self.peak = max(self.peak, self.bytes)

    def unregister(self, t):
        assert t.data_ptr() in self.registered, "unregistered memory that was not registered"
        del self.registered[t.data_ptr()]

    @property
    def bytes(self):
        return sum(self.registered.values())


@pytest.fixture
def fake_pins(monkeypatch):
    """Page-locking simulated on the CPU (pass pin_memory=True to the streamer)."""
    pins = FakePinning()
    monkeypatch.setattr(hostmem, "register", pins.register)
    monkeypatch.setattr(hostmem, "unregister", pins.unregister)
    return pins


@pytest.fixture(autouse=True)
def fresh_ledger(monkeypatch):
    """Each test gets its own process-wide pinned-memory ledger (default limit from this machine)."""
    ledger = hostmem.PinnedLedger()
    monkeypatch.setattr(hostmem, "LEDGER", ledger)
    return ledger
