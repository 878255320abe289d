"""nodes/memory.py against ComfyUI's real memory manager module, with the GPU simulated.

The suite has no GPU, so the pieces that read free VRAM are replaced by a fake device with a fixed
amount of free memory; everything else is ComfyUI's own comfy.model_management (imported in-process,
as ComfyUI does without argument parsing) and our hook installed on it.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch
from comfy_server import comfyui_path

MEMORY_PY = Path(__file__).resolve().parents[2] / "nodes" / "memory.py"
GIB = 1024**3
CUDA = torch.device("cuda", 0)


@pytest.fixture
def mm_and_memory(monkeypatch):
    monkeypatch.syspath_prepend(str(comfyui_path()))
    import comfy.cli_args

    comfy.cli_args.args.cpu = True  # as `main.py --cpu`: no CUDA initialisation on import
    import comfy.model_management as mm

    free = {"bytes": 2 * GIB}
    calls = []

    def fake_original_free_memory(memory_required, device, *args, **kwargs):
        calls.append((memory_required, device))  # ComfyUI's own unloading (nothing loaded here)
        return []

    monkeypatch.setattr(mm, "free_memory", fake_original_free_memory)
    monkeypatch.setattr(mm, "get_free_memory", lambda dev=None, torch_free_too=False: free["bytes"])
    monkeypatch.setattr(mm, "soft_empty_cache", lambda force=False: None)
    spec = importlib.util.spec_from_file_location("flux2local_memory_under_test", MEMORY_PY)
    memory = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, memory)
    spec.loader.exec_module(memory)
    memory.install_hooks()
    return mm, memory, free, calls


def _holder(memory, on_gpu: bool = True):
    class FakeHolder(memory.GpuHolder):
        def __init__(self):
            super().__init__()
            self.offloaded = 0
            if on_gpu:
                self.device = CUDA

        def _offload(self):
            self.offloaded += 1

    return FakeHolder()


def test_comfyui_unload_all_reaches_our_idle_models(mm_and_memory):
    mm, memory, free, calls = mm_and_memory
    idle, busy = _holder(memory), _holder(memory)
    busy.in_use = True
    mm.free_memory(1e30, CUDA)  # what unload_all_models() / "Free model and node cache" does
    assert calls == [(1e30, CUDA)]  # ComfyUI's own unloading still ran first
    assert idle.offloaded == 1 and not idle.on_gpu
    assert busy.offloaded == 0 and busy.on_gpu  # never evicted while a node is using it


def test_unload_all_runs_the_registered_cache_clearers_on_any_device(mm_and_memory):
    mm, memory, free, calls = mm_and_memory
    cleared = []
    memory.on_unload_all(lambda: cleared.append(1))
    memory.on_unload_all(lambda: 1 / 0)  # a failing clearer never breaks ComfyUI's unloading
    mm.free_memory(2 * GIB, CUDA)  # an ordinary request: caches stay
    assert cleared == []
    mm.unload_all_models()  # "Free model and node cache"; on --cpu its device is the CPU
    assert cleared == [1]
    assert calls[-1][0] == 1e30


def test_enough_free_memory_keeps_our_models(mm_and_memory):
    mm, memory, free, calls = mm_and_memory
    holder = _holder(memory)
    mm.free_memory(1 * GIB, CUDA)  # 2 GiB free: nothing of ours has to go
    assert holder.offloaded == 0 and holder.on_gpu


def test_hook_installed_once(mm_and_memory):
    mm, memory, free, calls = mm_and_memory
    hooked = mm.free_memory
    memory.install_hooks()
    assert mm.free_memory is hooked


def test_make_room_asks_for_the_reserve_too(mm_and_memory, monkeypatch):
    mm, memory, free, calls = mm_and_memory
    monkeypatch.setattr(mm, "EXTRA_RESERVED_VRAM", 3 * GIB)  # --reserve-vram 3
    memory.make_room(5 * GIB, CUDA)
    assert calls[-1][0] == 5 * GIB + mm.minimum_inference_memory()
    assert mm.minimum_inference_memory() >= 3 * GIB
    free["bytes"] = 10 * GIB
    assert memory.vram_budget(CUDA) == 10 * GIB - int(mm.minimum_inference_memory())
    memory.make_room(5 * GIB, torch.device("cpu"))  # CPU runs ask nothing of ComfyUI
    assert len(calls) == 1


def test_errors_give_the_vram_back(mm_and_memory):
    mm, memory, free, calls = mm_and_memory
    holder = _holder(memory)
    with pytest.raises(RuntimeError), holder.using(CUDA):
        assert holder.in_use
        raise RuntimeError("interrupted")  # e.g. ComfyUI's InterruptProcessingException
    assert holder.offloaded == 1 and not holder.in_use


def test_dynamic_vram_pools_never_keep_weights_between_nodes(mm_and_memory, monkeypatch):
    mm, memory, free, calls = mm_and_memory
    import comfy.memory_management

    holder = _holder(memory)
    with holder.using(CUDA):
        pass
    assert holder.offloaded == 0  # normal mode: the weights stay for the next run
    monkeypatch.setattr(comfy.memory_management, "aimdo_allocator", object(), raising=False)
    with holder.using(CUDA):
        pass
    assert holder.offloaded == 1  # --fast dynamic_vram: the node's pool dies with the node


def test_same_device_treats_default_index_as_current(mm_and_memory):
    _, memory, _, _ = mm_and_memory
    assert memory.same_device(torch.device("cuda"), torch.device("cuda", 0))
    assert not memory.same_device(torch.device("cuda", 1), torch.device("cuda", 0))
    assert not memory.same_device(torch.device("cpu"), torch.device("cuda", 0))
