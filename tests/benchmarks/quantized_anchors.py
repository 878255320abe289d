"""ComfyUI anchors for the quantized benchmark (used by ``quantized.py``, not a script of its own).

- GGUF: city96's ComfyUI-GGUF loads the same ``.gguf`` file the way its Unet Loader (GGUF) node does
  (``gguf_sd_loader`` + ``comfy.sd.load_diffusion_model_state_dict`` with its ``GGMLOps``, wrapped in
  its ``GGUFModelPatcher``), then ComfyUI's partial loading (``load_models_gpu``) keeps what fits and
  runs the rest through its lowvram path; ComfyUI-GGUF dequantizes every weight with torch ops on
  each forward.
- FP8: ComfyUI's native loader on the same ``fp8mixed`` safetensors file (``comfy_quant`` markers,
  per-tensor ``weight_scale``, static ``input_scale``), which runs its mixed-precision ops through
  comfy-kitchen where that package can be imported.

A budget of B GiB is set as a B GiB card sets it (ComfyUI's reserve raised by the free memory beyond
B), as in ``comfy_streaming.py``. On a machine without CUDA (``--smoke``) ComfyUI runs on the CPU and
only the resident case is measured: it proves the code path, not a speed.
"""

from __future__ import annotations

import gc
import importlib.util
import os
import statistics
import sys
import time
from pathlib import Path

import torch

GiB = 1 << 30


def find_comfyui_gguf(root: str) -> Path | None:
    """ComfyUI-GGUF: $COMFYUI_GGUF_PATH, the carried .device_quant/ComfyUI-GGUF, ~/ComfyUI-GGUF."""
    for p in (
        os.environ.get("COMFYUI_GGUF_PATH"),
        os.path.join(root, ".device_quant", "ComfyUI-GGUF"),
        os.path.expanduser("~/ComfyUI-GGUF"),
    ):
        if p and os.path.isfile(os.path.join(p, "loader.py")) and os.path.isfile(os.path.join(p, "nodes.py")):
            return Path(p)
    return None


def _import_comfyui(comfy_path: str, device: torch.device):
    if comfy_path not in sys.path:
        sys.path.insert(0, comfy_path)
    import comfy.cli_args

    if device.type == "cpu":
        comfy.cli_args.args.cpu = True  # before model_management decides on a device
    import comfy.model_management as mm
    import comfy.sd  # noqa: F401 - the loaders below

    return mm


def _import_comfyui_gguf(path: Path):
    """ComfyUI-GGUF as the package ComfyUI would import from custom_nodes (it uses relative imports)."""
    name = "comfyui_gguf_anchor"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(
            name, path / "__init__.py", submodule_search_locations=[str(path)]
        )
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return (
        importlib.import_module(f"{name}.loader"),
        importlib.import_module(f"{name}.ops"),
        importlib.import_module(f"{name}.nodes"),
    )


def _load_gguf_patcher(gguf_path: str, comfy_gguf: Path):
    import comfy.sd

    loader, ops, nodes = _import_comfyui_gguf(comfy_gguf)
    sd = loader.gguf_sd_loader(gguf_path)
    model = comfy.sd.load_diffusion_model_state_dict(sd, model_options={"custom_operations": ops.GGMLOps()})
    if model is None:
        raise RuntimeError(f"ComfyUI did not recognise {gguf_path}")
    return nodes.GGUFModelPatcher.clone(model)


def _load_native_patcher(path: str):
    import comfy.sd

    return comfy.sd.load_diffusion_model(path)


class _Runner:
    """A ComfyUI ModelPatcher loaded at budgets and stepped as its sampler does."""

    def __init__(self, mm, patcher, device: torch.device):
        self.mm, self.patcher, self.device = mm, patcher, device
        self.default_reserve = mm.EXTRA_RESERVED_VRAM

    def load(self, budget_gib: float | None, latent_shape) -> dict:
        mm = self.mm
        mm.unload_all_models()
        gc.collect()
        mm.soft_empty_cache()
        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        free = mm.get_free_memory(self.device)
        extra = 0 if budget_gib is None else max(0, int(free - budget_gib * GiB))
        mm.EXTRA_RESERVED_VRAM = self.default_reserve + extra
        base = self.patcher.model
        full = int(base.memory_required([2 * latent_shape[0], *latent_shape[1:]]))
        minimum = int(base.memory_required(list(latent_shape)))
        t0 = time.perf_counter()
        mm.load_models_gpu([self.patcher], memory_required=full, minimum_memory_required=minimum)
        if cuda:
            torch.cuda.synchronize()
        return dict(load_s=time.perf_counter() - t0, reserve_gib=mm.EXTRA_RESERVED_VRAM / GiB)

    def step(self, latent, sigma, context, guidance):
        return self.patcher.model.apply_model(latent, sigma, c_crossattn=context, guidance=guidance)

    def close(self) -> None:
        self.mm.unload_all_models()
        self.mm.EXTRA_RESERVED_VRAM = self.default_reserve
        self.patcher = None
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


def comfy_anchor(
    kind: str,
    file: str,
    root: str,
    budgets: list[str],
    inputs: dict,
    steps: int,
    bw: float | None,
    resident_step: float,
    timed_steps,
    log,
    device: torch.device,
    reference: torch.Tensor | None = None,
) -> dict:
    """ComfyUI on ``file`` at each budget ("all" = its default reserve).

    Args:
        kind: "gguf" (ComfyUI-GGUF's loader and ops) or "fp8" (ComfyUI's native fp8mixed path).
        reference: our resident output for the same input (its relative difference is reported).

    Returns:
        Figures per budget, or ``skipped`` with the reason.
    """
    from comfy_streaming import find_comfyui

    path = find_comfyui(root)
    if path is None:
        return dict(skipped="no ComfyUI tree found ($COMFYUI_PATH, .whl/comfyui-bench, ~/ComfyUI)")
    gguf_tree = find_comfyui_gguf(root) if kind == "gguf" else None
    if kind == "gguf" and gguf_tree is None:
        return dict(
            skipped="no ComfyUI-GGUF tree ($COMFYUI_GGUF_PATH, .device_quant/ComfyUI-GGUF, ~/ComfyUI-GGUF)"
        )
    try:
        mm = _import_comfyui(path, device)
        t0 = time.perf_counter()
        patcher = _load_gguf_patcher(file, gguf_tree) if kind == "gguf" else _load_native_patcher(file)
        load_s = time.perf_counter() - t0
    except Exception as exc:  # noqa: BLE001 - an anchor that cannot load is reported, not fatal
        return dict(skipped=f"{kind} anchor failed to load: {type(exc).__name__}: {str(exc)[:300]}")
    try:
        import comfy_kitchen  # noqa: F401

        kitchen = True
    except ImportError:
        kitchen = False
    runner = _Runner(mm, patcher, device)
    n = inputs["img"].shape[1]
    side = int(round(n**0.5))
    latent = inputs["img"].transpose(1, 2).reshape(1, 128, side, n // side)
    sigma = inputs["timesteps"].float()
    out = dict(comfy_path=path, file=file, file_load_s=load_s, comfy_kitchen=kitchen, rows=[])
    if kind == "gguf":
        out["comfyui_gguf_path"] = str(gguf_tree)
    model_bytes = patcher.model_size()
    out["model_gib"] = model_bytes / GiB
    order = [b for b in budgets if b != "all"] + [b for b in budgets if b == "all"]
    if device.type != "cuda":
        order = ["all"]  # ComfyUI's partial loading only means something with a GPU
    for b in order:
        try:
            info = runner.load(None if b == "all" else float(b.rstrip("GiB ")), tuple(latent.shape))
            kept = patcher.loaded_size()
            pinned = getattr(mm, "TOTAL_PINNED_MEMORY", 0)
            times = timed_steps(lambda: runner.step(latent, sigma, inputs["txt"], inputs["guidance"]), steps)
            with torch.inference_mode():
                y = runner.step(latent, sigma, inputs["txt"], inputs["guidance"])
        except Exception as exc:  # noqa: BLE001 - one budget failing (e.g. OOM) is a figure too
            log(f"[comfyui-{kind}] {b}: failed ({type(exc).__name__}: {str(exc)[:200]})")
            out["rows"].append(dict(budget=b, failed=f"{type(exc).__name__}: {str(exc)[:200]}"))
            continue
        steady = statistics.median(times[1:]) if len(times) > 1 else times[0]
        streamed = max(0, model_bytes - kept) if device.type == "cuda" else 0
        bound = max(resident_step, streamed / bw) if bw else resident_step
        row = dict(
            budget="all" if b == "all" else f"{b} GiB",
            kept_gib=kept / GiB,
            streamed_gib=streamed / GiB,
            steady_s=steady,
            first_s=times[0],
            bound_s=bound,
            ratio=steady / bound if bound else float("nan"),
            peak_vram_gib=(torch.cuda.max_memory_reserved() / GiB) if device.type == "cuda" else None,
            pinned_gib=pinned / GiB,
            steps=[round(t, 4) for t in times],
            **info,
        )
        if reference is not None:
            y = y.float().reshape(1, 128, -1).transpose(1, 2).cpu()
            row["rel_diff_vs_ours"] = float((y - reference.float()).norm() / reference.float().norm())
        out["rows"].append(row)
        log(
            f"[comfyui-{kind}] {row['budget']:>8}: steady {steady:.4f} s, bound {bound:.4f} s, ratio {row['ratio']:.3f}, "
            f"first {times[0]:.4f} s, kept {row['kept_gib']:.2f} GiB, streamed {row['streamed_gib']:.2f} GiB, "
            f"pinned {row['pinned_gib']:.2f} GiB"
            + (f", vs ours {row['rel_diff_vs_ours']:.2e}" if reference is not None else "")
        )
    runner.close()
    return out
