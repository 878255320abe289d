"""GPU benchmark: one denoising forward of full-size FLUX.2 [dev] and [klein] 9B (random bf16 weights,
1024x1024 = 4096 image tokens + 512 text tokens), ours against diffusers' Flux2Transformer2DModel and
ComfyUI's own FLUX.2 model (``comfy.ldm.flux.model.Flux``) when importable.

Not collected by pytest. Usage: ``python tests/benchmarks/transformer.py [--variants dev,klein-9b]
[--comfyui PATH]``. Prints one line per measurement, then a JSON line with every figure.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from flux2_core import Flux2Config, Flux2Transformer  # noqa: E402

DTYPE = torch.bfloat16


def _random_init_(model: torch.nn.Module, seed: int = 0) -> None:
    """Same weight statistics for every implementation: N(0, 1/fan_in) matrices, ones for norm scales."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0, p.shape[1] ** -0.5, generator=g)
            else:
                p.fill_(1.0)


def _inputs(c: Flux2Config, n_img: int, n_txt: int) -> dict:
    g = torch.Generator(device="cuda").manual_seed(1)
    side = int(n_img**0.5)
    img_ids = torch.zeros(1, n_img, 4, device="cuda")
    img_ids[0, :, 1] = torch.arange(n_img, device="cuda") // side
    img_ids[0, :, 2] = torch.arange(n_img, device="cuda") % side
    txt_ids = torch.zeros(1, n_txt, 4, device="cuda")
    txt_ids[0, :, 3] = torch.arange(n_txt, device="cuda")
    return dict(
        img=torch.randn(1, n_img, 128, device="cuda", generator=g, dtype=DTYPE),
        img_ids=img_ids,
        txt=torch.randn(1, n_txt, c.context_dim, device="cuda", generator=g, dtype=DTYPE),
        txt_ids=txt_ids,
        timesteps=torch.tensor([0.5], device="cuda"),
        guidance=torch.tensor([4.0], device="cuda") if c.guidance_embed else None,
    )


def _time(fn, warmup: int, iters: int) -> tuple[float, float]:
    """Median seconds of ``fn()`` and peak allocated GiB during the timed calls."""
    with torch.inference_mode():
        for _ in range(warmup):
            fn()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        times = []
        for _ in range(iters):
            t0 = time.perf_counter()
            fn()
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
    return statistics.median(times), torch.cuda.max_memory_allocated() / 2**30


def _free() -> None:
    gc.collect()
    torch.cuda.empty_cache()


def bench_ours(c: Flux2Config, x: dict, warmup: int, iters: int):
    model = Flux2Transformer(c, dtype=DTYPE, device="cuda").eval()
    _random_init_(model)
    weights = torch.cuda.memory_allocated() / 2**30
    t, peak = _time(lambda: model(**x), warmup, iters)
    model = None  # noqa: F841  (frees the weights before the next model)
    _free()
    return t, peak, weights


def bench_ours_fp8(c: Flux2Config, x: dict, warmup: int, iters: int):
    """Ours with every block Linear as FP8Linear (E4M3 weights, static input scale: torch._scaled_mm)."""
    from flux2_core.config import is_block_linear
    from flux2_core.quant import FP8Linear, quantize_fp8

    model = Flux2Transformer(c, dtype=DTYPE, device="cuda").eval()
    _random_init_(model)
    for name, _ in list(model.named_parameters()):
        if not is_block_linear(name):
            continue
        layer = name[: -len(".weight")]
        old = model.get_submodule(layer)
        new = FP8Linear(old.in_features, old.out_features, True, device="cuda")
        q, scale = quantize_fp8(old.weight.data)
        new.weight.data, new.weight_scale, new.input_scale = q, scale, torch.tensor(0.02, device="cuda")
        parent, _, attr = layer.rpartition(".")
        setattr(model.get_submodule(parent), attr, new)
        del old, q
    _free()
    weights = torch.cuda.memory_allocated() / 2**30
    t, peak = _time(lambda: model(**x), warmup, iters)
    model = None  # noqa: F841
    _free()
    return t, peak, weights


def bench_diffusers(c: Flux2Config, x: dict, warmup: int, iters: int):
    from diffusers import Flux2Transformer2DModel

    old = torch.get_default_dtype()
    torch.set_default_dtype(DTYPE)
    try:
        with torch.device("cuda"):
            model = Flux2Transformer2DModel(
                num_layers=c.depth,
                num_single_layers=c.depth_single,
                num_attention_heads=c.num_heads,
                joint_attention_dim=c.context_dim,
                guidance_embeds=c.guidance_embed,
            ).eval()
    finally:
        torch.set_default_dtype(old)
    _random_init_(model)
    weights = torch.cuda.memory_allocated() / 2**30

    def run():
        return model(
            hidden_states=x["img"],
            encoder_hidden_states=x["txt"],
            timestep=x["timesteps"],
            img_ids=x["img_ids"][0],
            txt_ids=x["txt_ids"][0],
            guidance=x["guidance"],
            return_dict=False,
        )[0]

    t, peak = _time(run, warmup, iters)
    model = None  # noqa: F841  (frees the weights before the next model)
    _free()
    return t, peak, weights


def bench_comfyui(c: Flux2Config, x: dict, warmup: int, iters: int, comfy_path: str):
    if comfy_path not in sys.path:
        sys.path.insert(0, comfy_path)
    import comfy.ldm.flux.model as flux_model
    import comfy.ops
    from comfy_streaming import unet_config  # same folder: ComfyUI's config for BFL FLUX.2 keys

    params = unet_config(c.hidden_size, c.num_heads, c.depth, c.depth_single, c.context_dim, c.guidance_embed)
    model = flux_model.Flux(
        dtype=DTYPE, device="cuda", operations=comfy.ops.disable_weight_init, **params
    ).eval()
    _random_init_(model)
    weights = torch.cuda.memory_allocated() / 2**30
    n = x["img"].shape[1]
    side = int(n**0.5)
    latent = x["img"].transpose(1, 2).reshape(1, 128, side, side)  # (B, 128, H/16, W/16)

    def run():
        return model(latent, x["timesteps"], x["txt"], guidance=x["guidance"])

    t, peak = _time(run, warmup, iters)
    model = None  # noqa: F841  (frees the weights before the next model)
    _free()
    return t, peak, weights


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--variants", default="dev,klein-9b")
    ap.add_argument("--anchors", default="diffusers,comfyui")
    ap.add_argument("--comfyui", default=os.environ.get("COMFYUI_PATH", str(Path.home() / "ComfyUI")))
    ap.add_argument("--image-tokens", type=int, default=4096)
    ap.add_argument("--text-tokens", type=int, default=512)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--fp8", action="store_true", help="also time ours with FP8 block linears (_scaled_mm)")
    ap.add_argument(
        "--lora", action="store_true", help="also run lora_bench.py (rank-32 LoRA, resident + merged)"
    )
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to benchmark")
        print(json.dumps({"skipped": "no CUDA device"}))
        return
    torch.backends.cuda.matmul.allow_tf32 = True
    results: dict = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "image_tokens": args.image_tokens,
        "text_tokens": args.text_tokens,
        "dtype": "bf16",
    }
    for variant in args.variants.split(","):
        c = Flux2Config.from_name(variant)
        x = _inputs(c, args.image_tokens, args.text_tokens)
        row: dict = {}
        runs = [("ours", bench_ours, ())]
        if args.fp8:
            runs.append(("ours_fp8", bench_ours_fp8, ()))
        if "diffusers" in args.anchors:
            runs.append(("diffusers", bench_diffusers, ()))
        if "comfyui" in args.anchors:
            runs.append(("comfyui", bench_comfyui, (args.comfyui,)))
        for name, fn, extra in runs:
            try:
                t, peak, weights = fn(c, x, args.warmup, args.iters, *extra)
            except Exception as e:  # an anchor that cannot run is reported, not fatal
                print(f"[{variant}] {name}: skipped ({type(e).__name__}: {str(e)[:300]})", flush=True)
                row[name] = {"skipped": f"{type(e).__name__}: {str(e)[:200]}"}
                _free()
                continue
            row[name] = {
                "seconds": round(t, 4),
                "peak_gib": round(peak, 2),
                "weights_gib": round(weights, 2),
                "activation_peak_gib": round(peak - weights, 2),
            }
            print(
                f"[{variant}] {name}: {t * 1000:.1f} ms, peak {peak:.2f} GiB "
                f"(weights {weights:.2f}, activations {peak - weights:.2f})",
                flush=True,
            )
        ours = row["ours"].get("seconds")
        for name in ("diffusers", "comfyui", "ours_fp8"):
            if ours and row.get(name, {}).get("seconds"):
                row[f"ratio_vs_{name}"] = round(row[name]["seconds"] / ours, 3)
                print(f"[{variant}] {name} / ours = {row[f'ratio_vs_{name}']:.3f}x", flush=True)
        results[variant] = row
        del x
        _free()
    if args.lora:
        import lora_bench  # same folder

        results["lora"] = lora_bench.run(["--parts", "resident,anchor"])
    print(json.dumps(results))


if __name__ == "__main__":
    main()
