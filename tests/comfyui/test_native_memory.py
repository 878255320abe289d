"""Our native MODEL under ComfyUI's real memory manager (comfy.model_management, in-process).

ComfyUI's LoadedModel / load_models_gpu / free_memory / unload_all_models drive our patcher as they
drive their own: full loads, partial loads with a byte budget (our weight streamer), memory taken
back (partially_unload), more memory granted, "Free model and node cache", clones with other LoRA
patches. The suite has no GPU, so the compute device is the CPU: ComfyUI's code paths and our
streamer's plan are the same, only the bytes do not move between two memories.
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
PACK = "flux2local_pack_under_test"


@pytest.fixture(scope="module")
def pack():
    """The pack's node modules imported as ComfyUI imports them (relative imports inside a package)."""
    if str(comfyui_path()) not in sys.path:
        sys.path.insert(0, str(comfyui_path()))
    import comfy.cli_args

    comfy.cli_args.args.cpu = True  # as `main.py --cpu`
    for name, path in ((PACK, ROOT), (f"{PACK}.nodes", ROOT / "nodes")):
        if name not in sys.modules:  # package shells: no __init__ (which would register the nodes)
            module = types.ModuleType(name)
            module.__path__ = [str(path)]
            sys.modules[name] = module
    ns = types.SimpleNamespace()
    for mod in ("nodes.native_patcher", "nodes.holders", "flux2_core", "flux2_core.tiny.transformer"):
        setattr(ns, mod.split(".")[-1], importlib.import_module(f"{PACK}.{mod}"))
    import comfy.model_management as mm
    import comfy.sd
    import comfy.utils

    ns.mm, ns.sd, ns.utils = mm, comfy.sd, comfy.utils
    return ns


@pytest.fixture(scope="module")
def model_file(tmp_path_factory, pack) -> Path:
    return pack.transformer.write_tiny_transformer(
        tmp_path_factory.mktemp("native-memory") / "m",
        "klein-4b",
        "bfl",
        dtype=torch.float32,
        depth=3,
        depth_single=4,
    )


def _forward(patcher, ctx_dim: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(2)
    x = torch.randn(1, 128, 4, 6, generator=g)
    ctx = torch.randn(1, 512, ctx_dim, generator=g)
    with torch.no_grad():
        return patcher.model.apply_model(x, torch.tensor([0.7]), c_crossattn=ctx, transformer_options={})


def test_loads_partial_loads_unloads_and_free_all(pack, model_file):
    mm = pack.mm
    model = pack.flux2_core.load_transformer(model_file, dtype=torch.float32)
    holder = pack.holders.ModuleHolder(
        model, "tiny", pack.holders.StreamingSettings(), source=str(model_file)
    )
    patcher = pack.native_patcher.native_model_for(holder)
    size = patcher.model_size()
    assert size == mm.module_size(patcher.model) and holder.total_bytes <= size < holder.total_bytes + 2**20
    assert patcher.loaded_size() == 0

    mm.load_models_gpu([patcher])  # a full load (CPU compute device: nothing moves)
    assert patcher.loaded_size() == size
    want = _forward(patcher, model.config.context_dim)

    # ComfyUI's low-VRAM load: the budget it computed -> our streamer with that budget
    loaded = next(m for m in mm.current_loaded_models if m.model is patcher)
    mm.current_loaded_models.remove(loaded)  # as free_memory does with what it unloads
    assert loaded.model_unload()  # all of it back (detach)
    assert patcher.loaded_size() == 0 and holder.streamer is None
    budget = int(size * 0.7)
    loaded = mm.LoadedModel(patcher)
    loaded.model_load(lowvram_model_memory=budget)
    s = holder.streamer
    assert s is not None and s.attached and s.plan.streamed_indices
    assert 0 < patcher.loaded_size() == s.plan.device_bytes <= budget
    assert patcher.model.model_lowvram and loaded.model_offloaded_memory() == size - patcher.loaded_size()
    assert torch.equal(_forward(patcher, model.config.context_dim), want)  # streamed = resident, bit for bit

    # ComfyUI needs memory for another model: part of ours is given back, the rest keeps working
    before = patcher.loaded_size()
    assert not loaded.model_unload(memory_to_free=before // 4)  # freed enough: stays loaded
    after = patcher.loaded_size()
    assert 0 < after <= before - before // 4 and holder.streamer.attached
    assert torch.equal(_forward(patcher, model.config.context_dim), want)

    # more memory becomes free: everything resident again
    loaded.model_use_more_vram(1e32)
    assert holder.streamer is None and patcher.loaded_size() == size and not patcher.model.model_lowvram
    assert torch.equal(_forward(patcher, model.config.context_dim), want)

    # "Free model and node cache" (POST /free) = unload_all_models
    mm.current_loaded_models.insert(0, loaded)
    mm.unload_all_models()
    assert all(m.model is not patcher for m in mm.current_loaded_models)
    assert patcher.loaded_size() == 0


def test_clones_share_the_module_and_carry_their_own_lora_patches(pack, model_file, tmp_path):
    from flux2_core.tiny.lora import write_tiny_lora

    mm = pack.mm
    model = pack.flux2_core.load_transformer(model_file, dtype=torch.float32)
    holder = pack.holders.ModuleHolder(
        model, "tiny", pack.holders.StreamingSettings(), source=str(model_file)
    )
    base = pack.native_patcher.native_model_for(holder)
    again = pack.native_patcher.native_model_for(holder)
    assert again.model is base.model and again.is_clone(base)  # one ComfyUI model per loaded transformer

    lora_file, _ = write_tiny_lora(tmp_path / "l.safetensors", model.config, "ai-toolkit", seed=4)
    lora_sd = pack.utils.load_torch_file(str(lora_file), safe_load=True)
    with_lora, _ = pack.sd.load_lora_for_models(base, None, lora_sd, 0.8, 0)
    assert with_lora.model is base.model and with_lora.patches and not base.patches

    mm.load_models_gpu([base])
    want = _forward(base, model.config.context_dim)
    mm.load_models_gpu([with_lora])  # ComfyUI swaps clones without moving weights
    got = _forward(with_lora, model.config.context_dim)

    reference = pack.flux2_core.load_transformer(model_file, dtype=torch.float32)
    pack.flux2_core.apply_loras(reference, [(pack.flux2_core.load_lora(lora_file), 0.8)])
    ref_holder = pack.holders.ModuleHolder(reference, "ref", None, source=str(model_file))
    ref_patcher = pack.native_patcher.native_model_for(ref_holder)
    mm.load_models_gpu([ref_patcher])
    torch.testing.assert_close(got, _forward(ref_patcher, model.config.context_dim), rtol=1e-5, atol=1e-5)
    assert (got - want).abs().max() > 1e-3

    mm.load_models_gpu([base])
    assert torch.equal(_forward(base, model.config.context_dim), want)  # the LoRA is gone again
    mm.unload_all_models()
