"""The nodes' holders in this process with ComfyUI's real memory manager, the CPU playing a small card.

What the server tests leave to a closer look: ComfyUI's own pinned bytes counting against our limit,
the LoRA holders sharing one kept streamer, a re-plan for another run's budget reusing the kept
buffers, the text encoder and its generator (which share layers) never both keeping pins, and a
forced out-of-memory error relieved through ``run``. The pack's ``nodes`` modules are imported as
ComfyUI sees them (inside a package, relative imports) without the node registration;
page-locking is simulated (it needs CUDA).
"""

from __future__ import annotations

import importlib
import sys
import types
from pathlib import Path

import pytest
import torch
from comfy_server import comfyui_path

ROOT = Path(__file__).resolve().parents[2]
PACK = "flux2local_pack_in_process"
MB = 1 << 20


class FakePins:
    def __init__(self):
        self.registered, self.calls = {}, 0

    def register(self, t):
        self.calls += 1
        assert t.data_ptr() not in self.registered
        self.registered[t.data_ptr()] = t.numel() * t.element_size()

    def unregister(self, t):
        del self.registered[t.data_ptr()]

    @property
    def bytes(self):
        return sum(self.registered.values())


@pytest.fixture(scope="module")
def pack():
    sys.path.insert(0, str(comfyui_path()))
    import comfy.cli_args

    comfy.cli_args.args.cpu = True  # as `main.py --cpu`: no CUDA initialisation on import
    for name, path in ((PACK, ROOT), (f"{PACK}.nodes", ROOT / "nodes")):
        module = types.ModuleType(name)
        module.__path__ = [str(path)]  # a package whose __init__ is not run: no node registration
        sys.modules[name] = module
    ns = types.SimpleNamespace(
        holders=importlib.import_module(f"{PACK}.nodes.holders"),
        memory=importlib.import_module(f"{PACK}.nodes.memory"),
        hostmem=importlib.import_module(f"{PACK}.weight_streaming.hostmem"),
        core=importlib.import_module(f"{PACK}.flux2_core"),
        mm=importlib.import_module("comfy.model_management"),
    )
    ns.memory.install_hooks()
    return ns


@pytest.fixture
def card(pack, monkeypatch):
    """The CPU as a card of ``card.vram`` bytes with simulated page-locking and a fresh pinned ledger."""
    pins = FakePins()
    monkeypatch.setattr(pack.hostmem, "register", pins.register)
    monkeypatch.setattr(pack.hostmem, "unregister", pins.unregister)
    monkeypatch.setattr(pack.hostmem, "LEDGER", pack.hostmem.PinnedLedger())
    monkeypatch.setattr(pack.memory, "CPU_STAND_IN", pack.memory.CpuStandIn(vram=64 * MB))
    yield types.SimpleNamespace(pins=pins, stand_in=pack.memory.CPU_STAND_IN)
    for h in list(pack.memory._HOLDERS):
        h.offload()
        if hasattr(h, "release_kept_pinned"):
            h.release_kept_pinned()


CPU = torch.device("cpu")


def _transformer(pack, tmp_path, seed=0):
    from flux2_core.tiny.transformer import write_tiny_transformer

    path = write_tiny_transformer(
        tmp_path / f"t{seed}.safetensors", "klein-4b", "bfl", seed=seed, depth=2, depth_single=4
    )
    return pack.core.load_transformer(path, dtype=torch.float32)


def _inputs(cfg, seed=0):
    g = torch.Generator().manual_seed(seed)
    return dict(
        img=torch.randn(1, 16, 128, generator=g),
        img_ids=torch.zeros(1, 16, 4),
        txt=torch.randn(1, 8, cfg.context_dim, generator=g),
        txt_ids=torch.zeros(1, 8, 4),
        timesteps=torch.full((1,), 0.5),
        guidance=None,
    )


def _block_bytes(model) -> list[int]:
    return [
        sum(p.numel() * p.element_size() for p in b.parameters())
        for b in [*model.double_blocks, *model.single_blocks]
    ]


def _budget_gb(model, n_blocks_resident: int) -> float:
    sizes = _block_bytes(model)
    fixed = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if "blocks" not in n)
    return (fixed + 2 * max(sizes) + sum(sorted(sizes)[:n_blocks_resident]) + 64 * 1024) / 1024**3


def test_comfyuis_own_pinned_bytes_count_against_our_limit(pack, card, tmp_path, monkeypatch):
    model = _transformer(pack, tmp_path)
    streamed = sum(_block_bytes(model))
    pack.memory.configure_host_memory()
    pack.hostmem.set_pinned_limit(streamed)
    monkeypatch.setattr(pack.mm, "TOTAL_PINNED_MEMORY", streamed // 2, raising=False)  # ComfyUI pinned half
    assert pack.hostmem.LEDGER.external() == streamed // 2
    holder = pack.holders.ModuleHolder(
        model, "t", pack.holders.StreamingSettings(vram_budget_gb=_budget_gb(model, 0))
    )
    with torch.no_grad(), holder.using(CPU):
        holder.prepare(CPU)
        t = holder.streamer.telemetry()
    assert 0 < t.pinned_bytes <= streamed // 2 and t.pinned_bytes + t.pageable_bytes == t.streamed_bytes
    assert card.pins.bytes <= streamed // 2


def test_disable_pinned_memory_turns_pinning_off_for_streamed_models(pack, card, tmp_path, monkeypatch):
    import comfy.cli_args

    monkeypatch.setattr(comfy.cli_args.args, "disable_pinned_memory", True)
    model = _transformer(pack, tmp_path)
    holder = pack.holders.ModuleHolder(
        model, "t", pack.holders.StreamingSettings(vram_budget_gb=_budget_gb(model, 1))
    )
    with torch.no_grad(), holder.using(CPU):
        holder.prepare(CPU)
        assert holder.streamer.config.pin_memory is False
        t = holder.streamer.telemetry()
    assert t.streamed_blocks > 0 and t.pinned_bytes == 0 and card.pins.calls == 0


def test_lora_holders_share_the_kept_streamer_and_a_new_budget_reuses_its_buffers(pack, card, tmp_path):
    from flux2_core.tiny.lora import write_tiny_lora

    model = _transformer(pack, tmp_path)
    reference = _transformer(pack, tmp_path)  # the same weights, never streamed
    lora_mod = importlib.import_module(f"{PACK}.flux2_core.lora")
    lora_path, _ = write_tiny_lora(tmp_path / "l.safetensors", model.config, "peft")
    lora = lora_mod.load_lora(lora_path)
    x = _inputs(model.config)
    with torch.no_grad():
        plain = reference(**x)
        lora_mod.apply_loras(reference, [(lora, 0.8)])
        with_lora = reference(**x)
        lora_mod.apply_loras(reference, [])

    base = pack.holders.ModuleHolder(model, "t", pack.holders.StreamingSettings())  # auto budget
    styled = base.with_loras([(lora, 0.8)])
    budget = _budget_gb(model, 3) * 1024**3
    card.stand_in.vram = int(budget)
    with torch.no_grad():
        with styled.using(CPU):
            out = styled.guarded(styled.prepare(CPU))(**x)
        torch.testing.assert_close(out, with_lora, rtol=0, atol=0)
        first = base.streamer.telemetry()
        calls = card.pins.calls
        base.offload()  # what ComfyUI's free_memory does to an idle holder
        # Streamed and resident blocks and the non-block weights all keep their page-locked copies.
        kept = base.streamer.kept_pinned_bytes
        assert kept == first.pinned_bytes + first.resident_pinned_bytes == card.pins.bytes
        assert (
            first.streamed_bytes > 0
            and kept >= first.streamed_bytes + first.resident_bytes + first.fixed_bytes
        )
        # The next run has more activations: a lower weight budget, more blocks streamed.
        with base.using(CPU):
            out = base.guarded(base.prepare(CPU, activation_bytes=int(budget * 0.25)))(**x)
        torch.testing.assert_close(out, plain, rtol=0, atol=0)  # the stack is gone again
        second = base.streamer.telemetry()
    assert second.budget < first.budget and second.streamed_bytes > first.streamed_bytes
    # Blocks resident before and streamed now keep their copies: nothing is page-locked again.
    assert second.reused_pinned_bytes + second.resident_reused_pinned_bytes == kept
    assert card.pins.calls == calls
    assert styled.streamer is base.streamer


def test_a_forced_out_of_memory_in_a_forward_is_relieved(pack, card, tmp_path):
    model = _transformer(pack, tmp_path)
    reference = _transformer(pack, tmp_path)
    x = _inputs(model.config, seed=3)
    holder = pack.holders.ModuleHolder(
        model, "t", pack.holders.StreamingSettings(vram_budget_gb=_budget_gb(model, 2))
    )
    failures = []

    def fail_once(_module, _args):
        handle.remove()
        failures.append(1)
        raise torch.OutOfMemoryError("simulated")

    handle = model.single_blocks[1].register_forward_pre_hook(fail_once)
    with torch.no_grad(), holder.using(CPU):
        guarded = holder.guarded(holder.prepare(CPU))
        before = holder.streamer.plan
        out = guarded(**x)
        after = holder.streamer.plan
        assert failures == [1] and holder.streamer.telemetry().oom_retries == 1
        torch.testing.assert_close(out, reference(**x), rtol=0, atol=0)
    assert after.device_bytes < before.device_bytes  # fewer blocks on the card after the relief
    # Without a streamer the error is the caller's (ComfyUI's own OOM handling).
    plain = pack.holders.ModuleHolder(reference, "r")
    reference.double_blocks[0].register_forward_pre_hook(_raise)
    with pytest.raises(torch.OutOfMemoryError), torch.no_grad():
        plain.guarded(plain.prepare(CPU))(**x)


def _raise(_module, _args):
    raise torch.OutOfMemoryError("simulated")


def test_the_encoder_and_its_generator_never_both_keep_pins(pack, card, tmp_path):
    from flux2_core.tiny.text_encoder import write_tiny_text_encoder

    folder = write_tiny_text_encoder(tmp_path / "qwen", kind="qwen3-4b", layout="hf")
    encoder = pack.core.load_text_encoder(folder, dtype=torch.float32, cache=None)
    holder = pack.holders.TextEncoderHolder(encoder, "te", pack.holders.StreamingSettings())
    layers = sum(p.numel() * p.element_size() for p in encoder.model.layers.parameters())
    fixed = sum(p.numel() * p.element_size() for p in encoder.parameters()) - layers
    card.stand_in.vram = fixed + layers // 2  # half the layers stream
    with torch.no_grad():
        with holder.using(CPU):
            expected = holder.run(holder.prepare(CPU).encode, ["a fox"])
        writer = holder.generator()
        card.stand_in.vram = (
            sum(p.numel() * p.element_size() for p in writer.module.parameters()) - layers // 2
        )
        with writer.using(CPU):
            writer.prepare(CPU)
            assert holder.streamer.kept_pinned_bytes == 0  # the encoder's pins went with its offload
        writer.offload()
        assert writer.streamer.kept_pinned_bytes > 0
        card.stand_in.vram = fixed + layers // 2
        with holder.using(CPU):
            again = holder.run(holder.prepare(CPU).encode, ["a fox"])
            assert writer.streamer.kept_pinned_bytes == 0
    torch.testing.assert_close(again, expected, rtol=0, atol=0)
    t = holder.streamer.telemetry()
    assert card.pins.bytes == pack.hostmem.LEDGER.used == t.pinned_bytes + t.resident_pinned_bytes


# ------------------------------------------------------------ models kept whole on the card
class DeviceCopies:
    """The stand-in's placements as a GPU does them: each one a real copy; records its source."""

    def __init__(self):
        self.sources, self.copies = [], []

    def __call__(self, t, device):
        self.sources.append(t.data_ptr())
        out = t.clone()
        self.copies.append(out)
        return out

    def holds(self, p) -> bool:
        ptr = p.data_ptr()
        return any(c.data_ptr() <= ptr < c.data_ptr() + c.numel() * c.element_size() for c in self.copies)


@pytest.fixture
def copies(pack, monkeypatch):
    rec = DeviceCopies()
    streamer = importlib.import_module(f"{PACK}.weight_streaming.streamer")
    monkeypatch.setattr(streamer, "_to_device", rec)
    allocs = []
    real = pack.hostmem.alloc_host
    monkeypatch.setattr(pack.hostmem, "alloc_host", lambda n: allocs.append(n) or real(n))
    rec.allocs = allocs
    return rec


def _in_pins(pins, ptr) -> bool:
    return any(start <= ptr < start + n for start, n in pins.registered.items())


def test_a_resident_model_is_placed_from_kept_pins_and_offloading_it_copies_nothing_back(
    pack, card, copies, tmp_path
):
    """The 12 GiB case: the transformer fits alone, so VAE decode (ComfyUI's free_memory) evicts it
    after every run and the next run places it again."""
    model = _transformer(pack, tmp_path)
    reference = _transformer(pack, tmp_path)
    x = _inputs(model.config, seed=5)
    with torch.no_grad():
        expected = reference(**x)
    holder = pack.holders.ModuleHolder(model, "t", pack.holders.StreamingSettings())  # auto budget
    first = None
    with torch.no_grad():
        for _ in range(4):  # cold, then warm runs
            copies.sources.clear()
            with holder.using(CPU):
                out = holder.guarded(holder.prepare(CPU))(**x)
                assert not holder.streams and all(copies.holds(p) for p in model.parameters())
            torch.testing.assert_close(out, expected, rtol=0, atol=0)
            # Every weight copy came from a page-locked buffer: one per block and one for the rest.
            weight_sources = [s for s in copies.sources if _in_pins(card.pins, s)]
            assert len(weight_sources) == len(_block_bytes(model)) + 1
            pack.mm.free_memory(card.stand_in.vram, CPU)  # what the decode's make_room asks for
            assert not holder.on_gpu
            host = [p.data_ptr() for p in model.parameters()]
            # Back on their page-locked host copies: no device tensor copied into new host memory.
            assert all(_in_pins(card.pins, p) for p in host)
            assert not any(copies.holds(p) for p in model.parameters())
            state = (host, len(copies.allocs), card.pins.calls, card.pins.bytes)
            if first is None:
                first = state
            assert state == first  # warm runs: the same host memory, nothing allocated or pinned again
    t = holder.streamer.telemetry()
    assert t.kept_pinned_bytes == card.pins.bytes == pack.hostmem.LEDGER.used > 0


def test_dynamic_vram_offloads_after_each_node_keep_the_pins(pack, card, copies, tmp_path, monkeypatch):
    import comfy.memory_management

    monkeypatch.setattr(comfy.memory_management, "aimdo_allocator", object(), raising=False)
    model = _transformer(pack, tmp_path)
    holder = pack.holders.ModuleHolder(model, "t", pack.holders.StreamingSettings())
    with torch.no_grad():
        with holder.using(CPU):
            holder.prepare(CPU)
        assert not holder.on_gpu  # each node's memory pool dies with the node
        calls, allocs = card.pins.calls, len(copies.allocs)
        copies.sources.clear()
        with holder.using(CPU):
            holder.prepare(CPU)
    assert card.pins.calls == calls and len(copies.allocs) == allocs
    assert sum(_in_pins(card.pins, s) for s in copies.sources) == len(_block_bytes(model)) + 1


def test_unload_all_releases_a_resident_models_pins_and_the_weights_stay(pack, card, copies, tmp_path):
    pack.memory.configure_host_memory()
    model = _transformer(pack, tmp_path)
    reference = _transformer(pack, tmp_path)
    x = _inputs(model.config)
    holder = pack.holders.ModuleHolder(model, "t", pack.holders.StreamingSettings())
    with torch.no_grad():
        with holder.using(CPU):
            holder.prepare(CPU)
        pack.mm.free_memory(card.stand_in.vram, CPU)
        assert card.pins.bytes > 0 and holder.streamer.kept_pinned_bytes == card.pins.bytes
        pack.mm.unload_all_models()  # the "Free model and node cache" button
        assert card.pins.bytes == 0 == pack.hostmem.LEDGER.used
        torch.testing.assert_close(model(**x), reference(**x), rtol=0, atol=0)
        with holder.using(CPU):
            out = holder.guarded(holder.prepare(CPU))(**x)  # pinned again on the next run
        assert card.pins.bytes > 0
    torch.testing.assert_close(out, reference(**x), rtol=0, atol=0)


def test_a_resident_model_pins_within_the_process_limit(pack, card, copies, tmp_path):
    model = _transformer(pack, tmp_path)
    reference = _transformer(pack, tmp_path)
    before = [p.data_ptr() for p in model.parameters()]
    limit = sum(_block_bytes(model)) // 2
    pack.hostmem.set_pinned_limit(limit)
    x = _inputs(model.config, seed=2)
    holder = pack.holders.ModuleHolder(model, "t", pack.holders.StreamingSettings())
    with torch.no_grad():
        with holder.using(CPU):
            out = holder.guarded(holder.prepare(CPU))(**x)
            t = holder.streamer.telemetry()
        holder.offload()
    assert not t.streamed_blocks and 0 < t.resident_pinned_bytes == card.pins.bytes <= limit
    torch.testing.assert_close(out, reference(**x), rtol=0, atol=0)
    # Past the limit the weights are placed from where they were loaded, and stay there.
    after = [p.data_ptr() for p in model.parameters()]
    assert all(_in_pins(card.pins, a) or a == b for a, b in zip(after, before))
    assert any(a == b for a, b in zip(after, before))


def test_the_vae_is_placed_whole_from_pins_and_offloading_copies_nothing_back(pack, card, copies, tmp_path):
    from flux2_core.tiny.vae import write_tiny_vae

    vae = pack.core.load_vae(write_tiny_vae(tmp_path / "ae.safetensors"), dtype=torch.float32)
    holder = pack.holders.ModuleHolder(vae, "FLUX.2 VAE")  # never streams
    z = torch.randn(1, vae.config.latent_channels, 4, 4)
    with torch.no_grad():
        expected = vae.decode(z)
        for _ in range(2):
            with holder.using(CPU):
                out = holder.prepare(CPU).decode(z)
            holder.offload()
            torch.testing.assert_close(out, expected, rtol=0, atol=0)
            assert all(_in_pins(card.pins, p.data_ptr()) for p in vae.parameters())
            assert not any(copies.holds(p) for p in vae.parameters())
    assert card.pins.calls == 1  # one buffer for the whole VAE, pinned once
