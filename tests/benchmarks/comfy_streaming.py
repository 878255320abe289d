"""ComfyUI anchor for the streaming benchmark: ComfyUI's own FLUX.2 model with its partial loading.

Used by `tests/benchmarks/streaming.py` (not a script of its own). The model is ComfyUI's
`model_base.Flux2` built from `supported_models.Flux2` with bf16 weights (random, made on the GPU and
handed over in host RAM, as a checkpoint loader would leave them), wrapped in a `ModelPatcher` and
loaded with `model_management.load_models_gpu`, the call ComfyUI's sampler makes before the first
step. ComfyUI then keeps what fits on the device and runs the rest through its lowvram path (weights
cast onto the device per layer on its offload streams, from host memory it pins in place).

A budget of B GiB is set as a B GiB card would set it: ComfyUI's own reserve
(`model_management.EXTRA_RESERVED_VRAM`, what `--reserve-vram` sets) is raised by the free memory
beyond B, so ComfyUI sees B GiB free above its usual reserve. `memory_required` and
`minimum_memory_required` come from the model's `memory_required`, as the sampler computes them for a
batch of one (x2 for CFG, as ComfyUI always estimates). Each budget starts from an unloaded model
(`unload_all_models`).

On the device machine (carry `.whl` and `.device_comfy`): `source tests/benchmarks/device_setup.sh` unpacks
the tree into /tmp/ComfyUI without its tokenizer files, which `supported_models` needs as modules, so
complete it first: `cp -rn .whl/comfyui-bench/comfy/text_encoders/. /tmp/ComfyUI/comfy/text_encoders/`.
"""

from __future__ import annotations

import gc
import os
import statistics
import sys
import time

import torch

GiB = 1 << 30


def find_comfyui(root: str) -> str | None:
    """The ComfyUI tree to import: $COMFYUI_PATH, the carried copy in .whl/comfyui-bench, ~/ComfyUI."""
    for path in (
        os.environ.get("COMFYUI_PATH"),
        os.path.join(root, ".whl", "comfyui-bench"),
        os.path.expanduser("~/ComfyUI"),
    ):
        # supported_models imports every text encoder module; the device tarball leaves out the
        # *tokenizer* files, so a tree without spiece_tokenizer.py cannot build the model config.
        needs = ("model_patcher.py", os.path.join("text_encoders", "spiece_tokenizer.py"))
        if path and all(os.path.isfile(os.path.join(path, "comfy", f)) for f in needs):
            return path
    return None


def unet_config(
    hidden: int, heads: int, depth: int, depth_single: int, context: int, guidance: bool = True
) -> dict:
    """ComfyUI's unet config for a FLUX.2 transformer (what its model detection gives for BFL keys)."""
    return dict(
        image_model="flux2",
        axes_dim=[32, 32, 32, 32],
        num_heads=heads,
        mlp_ratio=3.0,
        theta=2000,
        out_channels=128,
        global_modulation=True,
        mlp_silu_act=True,
        qkv_bias=False,
        ops_bias=False,
        default_ref_method="index",
        ref_index_scale=10.0,
        txt_ids_dims=[3],
        patch_size=1,
        in_channels=128,
        hidden_size=hidden,
        context_in_dim=context,
        vec_in_dim=None,
        depth=depth,
        depth_single_blocks=depth_single,
        guidance_embed=guidance,
    )


class ComfyFlux2:
    """ComfyUI's FLUX.2 BaseModel and ModelPatcher on random weights, ready for `load_models_gpu`."""

    def __init__(self, comfy_path: str, cfg: dict, materialize, device: torch.device) -> None:
        if comfy_path not in sys.path:
            sys.path.insert(0, comfy_path)
        import comfy.model_management as mm
        import comfy.model_patcher
        import comfy.supported_models

        self.mm = mm
        self.device = device
        self.default_reserve = mm.EXTRA_RESERVED_VRAM
        model_config = comfy.supported_models.Flux2(cfg)
        model_config.set_inference_dtype(torch.bfloat16, None)
        # The diffusion model on meta, then random weights in host RAM (see streaming.materialize_random).
        self.base = model_config.get_model({}, device=torch.device("meta"))
        self.build_s = materialize(self.base.diffusion_model)
        self.base.device = torch.device("cpu")  # where comfy.sd leaves a freshly loaded model
        self.patcher = comfy.model_patcher.ModelPatcher(
            self.base, load_device=device, offload_device=torch.device("cpu")
        )
        self.model_bytes = self.patcher.model_size()
        self.num_streams = mm.NUM_STREAMS
        self.pinned_cap = mm.MAX_PINNED_MEMORY

    def memory_required(self, latent_shape: tuple[int, ...]) -> tuple[int, int]:
        """(memory_required, minimum_memory_required) as ComfyUI's sampler estimates them."""
        b = latent_shape[0]
        full = self.base.memory_required([b * 2, *latent_shape[1:]])
        minimum = self.base.memory_required([b, *latent_shape[1:]])
        return int(full), int(minimum)

    def load(self, budget_gib: float | None, latent_shape: tuple[int, ...]) -> dict:
        """Unload, set the reserve for the budget (None = ComfyUI's default), load_models_gpu."""
        mm = self.mm
        mm.unload_all_models()
        gc.collect()
        mm.soft_empty_cache()
        torch.cuda.empty_cache()
        # Peaks count from here: the previous budget's weights are gone.
        torch.cuda.reset_peak_memory_stats()
        base_alloc = torch.cuda.memory_allocated()
        free = mm.get_free_memory(self.device)
        extra = 0 if budget_gib is None else max(0, int(free - budget_gib * GiB))
        mm.EXTRA_RESERVED_VRAM = self.default_reserve + extra
        full, minimum = self.memory_required(latent_shape)
        t0 = time.perf_counter()
        mm.load_models_gpu([self.patcher], memory_required=full, minimum_memory_required=minimum)
        torch.cuda.synchronize()
        return dict(
            load_s=time.perf_counter() - t0,
            base_alloc=base_alloc,
            free_before_gib=free / GiB,
            reserve_gib=mm.EXTRA_RESERVED_VRAM / GiB,
            memory_required_gib=full / GiB,
            minimum_memory_required_gib=minimum / GiB,
        )

    def step(self, latent, sigma, context, guidance):
        """One denoising forward the way ComfyUI's sampler calls it (BaseModel.apply_model)."""
        return self.base.apply_model(latent, sigma, c_crossattn=context, guidance=guidance)

    def close(self) -> None:
        self.mm.unload_all_models()
        self.mm.EXTRA_RESERVED_VRAM = self.default_reserve
        self.patcher = self.base = None
        gc.collect()
        torch.cuda.empty_cache()


def comfyui_anchor(
    root: str,
    budgets: list[str],
    inputs: dict,
    steps: int,
    bw: float,
    resident_step: float,
    small: bool,
    materialize,
    timed_steps,
    log,
    model_cfg=None,
) -> dict:
    """ComfyUI partial loading at each budget ("all" = its default reserve), against our bound.

    The bound is the same as ours: max(our resident step, streamed bytes / pinned copy bandwidth), with
    streamed bytes = model bytes - what ComfyUI kept on the device. ``model_cfg`` (a flux2_core
    ``Flux2Config``) gives other shapes than [dev]'s, e.g. [klein] 4B.
    """
    path = find_comfyui(root)
    if path is None:
        return dict(skipped="no ComfyUI tree found ($COMFYUI_PATH, .whl/comfyui-bench, ~/ComfyUI)")
    dev = torch.device("cuda", torch.cuda.current_device())
    if model_cfg is not None:
        c = model_cfg
        cfg = unet_config(
            c.hidden_size, c.num_heads, c.depth, c.depth_single, c.context_dim, c.guidance_embed
        )
    else:
        H = 1536 if small else 6144
        cfg = unet_config(H, H // 128, 8, 48, inputs["txt"].shape[-1])
    try:
        cm = ComfyFlux2(path, cfg, materialize, dev)
    except Exception as exc:  # noqa: BLE001 - a tree that cannot be imported is reported, not fatal
        return dict(skipped=f"ComfyUI at {path} failed to build: {type(exc).__name__}: {str(exc)[:300]}")
    n = inputs["img"].shape[1]
    side = int(n**0.5)
    latent = inputs["img"].transpose(1, 2).reshape(1, 128, side, side)  # (B, 128, H/16, W/16)
    sigma = inputs["timesteps"].float()
    out = dict(
        comfy_path=path,
        async_offload_streams=cm.num_streams,
        pinned_cap_gib=cm.pinned_cap / GiB,
        model_gib=cm.model_bytes / GiB,
        build_s=cm.build_s,
        rows=[],
    )
    log(
        f"[comfyui] tree {path}, model {cm.model_bytes / GiB:.1f} GiB, built in {cm.build_s:.1f} s, "
        f"{cm.num_streams} offload streams, pinned cap {cm.pinned_cap / GiB:.0f} GiB"
    )
    order = [b for b in budgets if b != "all"] + [b for b in budgets if b == "all"]  # resident last
    for b in order:
        try:
            info = cm.load(None if b == "all" else float(b), tuple(latent.shape))
            kept = cm.patcher.loaded_size()
            pinned = cm.mm.TOTAL_PINNED_MEMORY
            times = timed_steps(lambda: cm.step(latent, sigma, inputs["txt"], inputs["guidance"]), steps)
        except Exception as exc:  # noqa: BLE001 - one budget failing (e.g. OOM) is a figure too
            log(f"[comfyui] {b}: failed ({type(exc).__name__}: {str(exc)[:200]})")
            out["rows"].append(dict(budget=b, failed=f"{type(exc).__name__}: {str(exc)[:200]}"))
            continue
        steady = statistics.median(times[1:]) if len(times) > 1 else times[0]
        streamed = max(0, cm.model_bytes - kept)
        bound = max(resident_step, streamed / bw)
        row = dict(
            budget="all" if b == "all" else f"{b} GiB",
            kept_gib=kept / GiB,
            streamed_gib=streamed / GiB,
            steady_s=steady,
            first_s=times[0],
            bound_s=bound,
            ratio=steady / bound,
            first_over_steady=times[0] / steady,
            peak_alloc_gib=(torch.cuda.max_memory_allocated() - info.pop("base_alloc")) / GiB,
            peak_reserved_gib=torch.cuda.max_memory_reserved() / GiB,
            pinned_gib=pinned / GiB,
            lowvram=bool(cm.base.model_lowvram),
            steps=[round(t, 4) for t in times],
            **info,
        )
        out["rows"].append(row)
        log(
            f"[comfyui] {row['budget']:>7}: steady {steady:.3f} s, bound {bound:.3f} s, ratio {row['ratio']:.3f}, "
            f"first {times[0]:.3f} s ({row['first_over_steady']:.2f}x), kept {row['kept_gib']:.1f} GiB, "
            f"streamed {row['streamed_gib']:.1f} GiB, peak reserved {row['peak_reserved_gib']:.2f} GiB "
            f"(allocated {row['peak_alloc_gib']:.2f}), pinned {row['pinned_gib']:.1f} GiB, load {info['load_s']:.1f} s, "
            f"reserve {info['reserve_gib']:.1f} GiB"
        )
    cm.close()
    return out
