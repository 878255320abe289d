"""The nodes' model holder on a real GPU with ComfyUI's real memory manager.

What the CPU suite cannot show: ``ModuleHolder.prepare`` attaching the weight streamer when the
model is over the VRAM budget, sampling through it on CUDA, ComfyUI's "free memory" path giving
the VRAM back while really page-locked buffers stay for the next run, and "unload all" unpinning them. The pack's ``nodes`` modules are imported as ComfyUI would see them (inside a
package, relative imports) without running the node registration (no server needed).
"""

from __future__ import annotations

import importlib
import sys
import types
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
PACK = "flux2local_pack_under_test"

pytestmark = pytest.mark.gpu


def _comfyui_path() -> Path:
    sys.path.insert(0, str(ROOT / "workflows"))
    from comfy_server import comfyui_path

    return comfyui_path()


@pytest.fixture(scope="module")
def holders():
    """``nodes.holders`` and ``nodes.memory`` loaded inside a synthetic package named like a custom node."""
    sys.path.insert(0, str(_comfyui_path()))
    for name, path in ((PACK, ROOT), (f"{PACK}.nodes", ROOT / "nodes")):
        module = types.ModuleType(name)
        module.__path__ = [str(path)]  # a package whose __init__ is not run: no node registration
        sys.modules[name] = module
    holders = importlib.import_module(f"{PACK}.nodes.holders")
    memory = importlib.import_module(f"{PACK}.nodes.memory")
    memory.install_hooks()
    memory.configure_host_memory()  # as the pack's entry point: unload-all releases kept pins
    return holders, memory


def _sample(transformer, cfg, device):
    from flux2_core import sample_latents

    gen = torch.Generator().manual_seed(0)
    txt = torch.randn(1, 32, cfg.context_dim, generator=gen).to(device)
    noise = torch.randn(1, 128, 8, 8, generator=gen).to(device)
    return sample_latents(
        transformer=transformer,
        prompt_embeds=txt,
        width=128,
        height=128,
        steps=3,
        guidance=4.0,
        seed=0,
        noise=noise,
    )


def test_streamed_holder_matches_resident_and_gives_vram_back(holders, tmp_path):
    from flux2_core import load_transformer
    from flux2_core.tiny.transformer import write_tiny_transformer

    holders, memory = holders
    path = tmp_path / "flux2-dev.safetensors"
    write_tiny_transformer(path, "dev", "bfl", dtype=torch.bfloat16, seed=0, depth=3, depth_single=6)
    device = torch.device("cuda")

    resident = load_transformer(path, dtype=torch.bfloat16, device=device)
    expected = _sample(resident, resident.config, device)
    del resident
    torch.cuda.empty_cache()

    model = load_transformer(path, dtype=torch.bfloat16, device="cpu")
    block_bytes = sum(p.numel() * p.element_size() for p in model.double_blocks[0].parameters())
    # A budget of about two double blocks: the rest must be streamed.
    settings = holders.StreamingSettings(vram_budget_gb=2.5 * block_bytes / holders.GIB)
    holder = holders.ModuleHolder(model, "tiny dev", settings)
    before = torch.cuda.memory_allocated()
    with holder.using(device):
        streamed_model = holder.prepare(device)
        assert holder.streamer is not None, "over budget, the holder must stream instead of moving everything"
        got = _sample(streamed_model, model.config, device)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)  # streaming must not change numerics
    assert holder.on_gpu and torch.cuda.memory_allocated() > before

    # ComfyUI needing VRAM (its free_memory for another model) offloads our idle holder: the VRAM
    # comes back, the page-locked host buffers stay for the next run.
    import comfy.model_management as mm

    hostmem = importlib.import_module(f"{PACK}.weight_streaming.hostmem")
    streamed = holder.streamer.telemetry().streamed_bytes
    mm.free_memory(torch.cuda.get_device_properties(0).total_memory, device)
    assert not holder.on_gpu and holder.streamer.kept_pinned_bytes == streamed > 0
    assert torch.cuda.memory_allocated() <= before + 1024**2
    assert all(buf.pinned for buf in holder.streamer._kept.values())
    with holder.using(device):
        again = _sample(holder.prepare(device), model.config, device)
        t = holder.streamer.telemetry()
    assert t.reused_pinned_bytes == t.streamed_bytes == streamed  # attached again without pinning
    torch.testing.assert_close(again, expected, rtol=0, atol=0)

    # "Free model and node cache" / unload_all_models: VRAM back and the kept pins released too.
    mm.unload_all_models()
    assert not holder.on_gpu and holder.streamer.kept_pinned_bytes == 0
    assert hostmem.pinned_in_use() == 0
    assert torch.cuda.memory_allocated() <= before + 1024**2
