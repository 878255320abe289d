"""GPU benchmark: one denoising forward of FLUX.2 (random weights; 1024^2 = 4096 image tokens + 512 text
tokens, [klein] 4B also at 512^2), ours eager and fast against ComfyUI as users run it and diffusers.

Rows (``--cases``): [dev] bf16, [klein] 9B bf16, [dev] FP8, [klein] 9B FP8 (per-tensor weight scales,
a static input scale on every block linear), [klein] 4B at 512^2. For each:
- ours eager (the reference blocks), ours fast (torch.compile per block stage, CUDA graphs where the
  shapes are small), with the first call's extra cost (compile / capture) reported apart, ours with
  comfy-kitchen's fused kernels (the fast path without Triton), and for FP8 ours through the
  weight-only path of GPUs without FP8 tensor cores (forced; compared with our bf16 step);
- ComfyUI with comfy-kitchen, ComfyUI with its TorchCompileModel, ComfyUI without comfy-kitchen (bf16),
  ComfyUI's own FP8 path (``comfy_quant`` state dict through its mixed-precision ops, with comfy-kitchen;
  also without ``input_scale``), each in a child process (`comfy_transformer.py`);
- diffusers' Flux2Transformer2DModel (bf16);
- peak activation memory (peak allocated minus weights) of every row;
- optional quantized attention (``--attention kitchen-int8,sage``) with its error against SDPA;
- numerics (``--numerics``): relative error of eager and fast against an fp32 model on the same
  weights and inputs, full width with a few blocks.

Usage on the lent GPU (see DEVELOPERS.md; carry .whl, .device_comfy and .device_kitchen):
    source tests/benchmarks/device_setup.sh; python3 tests/benchmarks/transformer.py
    python3 tests/benchmarks/transformer.py --cases dev,dev-fp8 --anchors comfyui     # a subset
    python3 tests/benchmarks/transformer.py --smoke     # CPU, tiny shapes: checks every code path
comfy-kitchen comes from ``--kitchen`` (default $KITCHEN_PATH): a folder holding ``comfy_kitchen/``.
Prints one line per measurement, a table, then a JSON line with every figure.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import torch  # noqa: E402
from bench_report import log, print_row, summarize  # noqa: E402
from bench_util import (  # noqa: E402
    CASES,
    DTYPE,
    INPUT_SCALE,
    ROOT,
    allocated_gib,
    device,
    free,
    inputs,
    random_init_,
    time_it,
)

from flux2_core import Flux2Transformer  # noqa: E402
from flux2_core.config import is_block_linear  # noqa: E402

ALL_ANCHORS = ("comfyui", "comfyui-compile", "comfyui-nokitchen", "comfyui-fp8", "diffusers")


# --------------------------------------------------------------------------- ours
def build_ours(cfg, dev) -> Flux2Transformer:
    model = Flux2Transformer(cfg, dtype=DTYPE, device=dev).eval()
    random_init_(model, dev)
    return model


def to_fp8(model, dev) -> None:
    """Every block Linear becomes an FP8Linear: E4M3 weights, per-tensor scale, static input scale."""
    from flux2_core.quant import FP8Linear, quantize_fp8

    for name in [n[: -len(".weight")] for n, _ in model.named_parameters() if is_block_linear(n)]:
        old = model.get_submodule(name)
        new = FP8Linear(old.in_features, old.out_features, True, device=dev)
        q, scale = quantize_fp8(old.weight.data)
        new.weight.data = q
        new.weight_scale.data = scale.to(dev)
        new.input_scale.data = torch.tensor(INPUT_SCALE, device=dev)
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent), attr, new)
        del old, q


def weight_only(model) -> None:
    """Drop the static input scales: FP8 layers then dequantize and run the matmul in bf16, the path of
    GPUs without FP8 tensor cores (RTX 3090), forced here on any GPU."""
    from flux2_core.quant import FP8Linear

    for mod in model.modules():
        if isinstance(mod, FP8Linear):
            mod.input_scale = None


def time_ours(model, x, dev, args, mode: str, attention: str = "sdpa") -> dict:
    from flux2_core.fast import COMPILE_STATS

    model.fast_path, model.attention = mode, attention
    model.cuda_graphs = "auto" if mode != "eager" else "off"
    model.release_fast_path()
    before = COMPILE_STATS.seconds
    r = time_it(lambda: model(**x), dev, args.warmup, args.iters, allocated_gib(dev))
    st = model.fast.status()
    r.update(mode=st["mode"], compile_s=round(COMPILE_STATS.seconds - before, 2), graphs=st["graph_captures"])
    if st["failures"]:
        r["failures"] = st["failures"]
    return r


def run_ours(case, cfg, x, dev, args, row: dict) -> None:
    model = build_ours(cfg, dev)
    if case.fp8:
        to_fp8(model, dev)
        free(dev)
    modes = ["eager", "compile", "kitchen"]
    for mode in modes:
        if mode == "kitchen" and not _kitchen_importable():
            row["ours_kitchen"] = {"skipped": "comfy-kitchen not importable"}
            continue
        key = "ours_eager" if mode == "eager" else "ours_fast" if mode == "compile" else "ours_kitchen"
        row[key] = time_ours(model, x, dev, args, mode)
        print_row(case.name, key, row[key])
    for backend in [b for b in args.attention.split(",") if b]:
        key = f"ours_fast_attn_{backend}"
        err = attention_error(backend, cfg, x, dev)
        if isinstance(err, str):
            row[key] = {"skipped": err}
        else:
            row[key] = time_ours(model, x, dev, args, "compile", backend)
            row[key]["error_vs_sdpa"] = err
        print_row(case.name, key, row[key])
    if case.fp8:
        weight_only(model)
        for mode in ("eager", "compile"):
            key = f"ours_weight_only_{'eager' if mode == 'eager' else 'fast'}"
            row[key] = time_ours(model, x, dev, args, mode)
            print_row(case.name, key, row[key])
    model.release_fast_path()
    del model
    free(dev)


def attention_error(backend, cfg, x, dev) -> dict | str:
    from flux2_core.fast import attention as attn

    ok, why = attn._available(backend, dev)
    if not ok:
        return f"unavailable: {why}"
    g = torch.Generator(device=dev).manual_seed(0)
    n = x["img"].shape[1] + x["txt"].shape[1]
    q, k, v = (torch.randn(1, n, cfg.num_heads, 128, device=dev, dtype=DTYPE, generator=g) for _ in range(3))
    return attn.attention_error(attn._FUNCTIONS[backend], q, k, v)


def _kitchen_importable() -> bool:
    try:
        import comfy_kitchen  # noqa: F401
    except ImportError:
        return False
    return True


# --------------------------------------------------------------------------- anchors
def run_diffusers(case, cfg, x, dev, args, row: dict) -> None:
    from diffusers import Flux2Transformer2DModel

    old = torch.get_default_dtype()
    torch.set_default_dtype(DTYPE)
    try:
        with torch.device(dev):
            model = Flux2Transformer2DModel(
                num_layers=cfg.depth,
                num_single_layers=cfg.depth_single,
                num_attention_heads=cfg.num_heads,
                joint_attention_dim=cfg.context_dim,
                guidance_embeds=cfg.guidance_embed,
            ).eval()
    finally:
        torch.set_default_dtype(old)
    random_init_(model, dev)

    def fwd():
        return model(
            hidden_states=x["img"],
            encoder_hidden_states=x["txt"],
            timestep=x["timesteps"],
            img_ids=x["img_ids"][0],
            txt_ids=x["txt_ids"][0],
            guidance=x["guidance"],
            return_dict=False,
        )[0]

    row["diffusers"] = time_it(fwd, dev, args.warmup, args.iters, allocated_gib(dev))
    print_row(case.name, "diffusers", row["diffusers"])
    model = None  # frees the weights before the next anchor
    free(dev)


def run_comfy(case, args, row: dict, kitchen: bool, what: list[str]) -> None:
    """One child process per comfy-kitchen setting (see comfy_transformer.py)."""
    if not what:
        return
    cmd = [sys.executable, str(HERE / "comfy_transformer.py"), "--case", case.name, "--what", ",".join(what)]
    cmd += ["--comfyui", args.comfyui, "--warmup", str(args.warmup), "--iters", str(args.iters)]
    env = dict(os.environ)
    if args.smoke:
        cmd.append("--smoke")
    if kitchen:
        if args.kitchen:
            env["PYTHONPATH"] = os.pathsep.join(p for p in (args.kitchen, env.get("PYTHONPATH")) if p)
    else:
        cmd.append("--no-kitchen")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.anchor_timeout)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        reason = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        for w in what:
            row[_comfy_key(w, kitchen)] = {
                "skipped": f"worker failed (rc {proc.returncode}): {' | '.join(reason)[:300]}"
            }
        return
    res = json.loads(lines[-1])
    if "skipped" in res:
        for w in what:
            row[_comfy_key(w, kitchen)] = {"skipped": res["skipped"]}
        return
    if kitchen and not res.get("kitchen"):
        note = "comfy-kitchen was not importable in the worker (pass --kitchen or set KITCHEN_PATH)"
        for w in what:
            res[w] = {"skipped": note}
    for w in what:
        row[_comfy_key(w, kitchen)] = res[w]
        print_row(case.name, _comfy_key(w, kitchen), res[w])


def _comfy_key(what: str, kitchen: bool) -> str:
    base = {
        "bf16": "comfyui",
        "compile": "comfyui_compile",
        "fp8": "comfyui_fp8",
        "fp8-noscale": "comfyui_fp8_noscale",
    }[what]
    return base if kitchen else base + "_nokitchen"


# --------------------------------------------------------------------------- numerics
def numerics(args, dev) -> dict:
    """Eager and fast against fp32 on the same weights and inputs (full width, a few blocks)."""
    sys.path.insert(0, str(ROOT / "tests" / "core"))
    from fast_numerics import build, calibrate_input_scales, errors_by_mode, fp32_reference_of, inputs_for
    from fast_numerics import to_fp8 as fp8_of

    from flux2_core import Flux2Config
    from flux2_core.fast import kitchen_available
    from weight_streaming.estimate import fp8_matmul_supported

    if args.smoke:
        cfg = Flux2Config.from_name("dev").replace(
            variant="custom", hidden_size=256, num_heads=2, depth=1, depth_single=2, context_dim=64
        )
        n_img, n_txt = 64, 16
    else:
        cfg = Flux2Config.from_name("dev").replace(variant="custom", depth=1, depth_single=2)
        n_img, n_txt = 4096, 512
    modes = (
        ("eager", "compile", "kitchen") if (kitchen_available(dev)[0] or args.smoke) else ("eager", "compile")
    )
    x = inputs_for(cfg, dev, n_img, n_txt)
    out = {}
    with torch.inference_mode():
        ref_out = build(cfg, torch.float32, dev)(**x)
    free(dev)
    out["bf16"] = errors_by_mode(build(cfg, torch.bfloat16, dev), ref_out, x, modes)
    fp8_paths = [("fp8_weight_only", False)]
    if fp8_matmul_supported(dev):
        fp8_paths.insert(0, ("fp8_scaled_mm", True))
    else:
        log(
            "[numerics] no FP8 tensor cores here: our FP8 layers dequantize, so only the weight-only path is measured"
        )
    for label, static in fp8_paths:
        model = build(cfg, torch.bfloat16, dev)
        fp8_of(model, calibrate_input_scales(model, x) if static else None)
        ref = fp32_reference_of(model, cfg, dev)
        with torch.inference_mode():
            r = ref(**x)
        del ref
        free(dev)
        out[label] = errors_by_mode(model, r, x, modes)
        del model
        free(dev)
    for k, v in out.items():
        ratios = {m: round(e / v["eager"], 3) for m, e in v.items() if m != "eager"}
        log(
            f"[numerics] {k}: relative error vs fp32 { ({m: f'{e:.3e}' for m, e in v.items()}) }, ratio to eager {ratios}"
        )
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--anchors", default=",".join(ALL_ANCHORS))
    ap.add_argument("--comfyui", default=os.environ.get("COMFYUI_PATH", str(Path.home() / "ComfyUI")))
    ap.add_argument("--kitchen", default=os.environ.get("KITCHEN_PATH"), help="folder holding comfy_kitchen/")
    ap.add_argument("--attention", default="", help="also time these attention backends: kitchen-int8,sage")
    ap.add_argument("--numerics", action="store_true", help="errors against fp32 (also on with --smoke)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument(
        "--lora", action="store_true", help="also run lora_bench.py (rank-32 LoRA, resident + merged)"
    )
    ap.add_argument("--anchor-timeout", type=int, default=900)
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny shapes: check the script")
    args = ap.parse_args()
    if args.kitchen and args.kitchen not in sys.path:
        sys.path.insert(0, args.kitchen)
    dev = device(args.smoke)
    if dev.type == "cuda" and not torch.cuda.is_available():
        log("no CUDA device: run with --smoke to check the script on the CPU")
        log(json.dumps({"skipped": "no CUDA device"}))
        return
    if args.smoke:
        args.warmup, args.iters = 1, 2
        log(
            "[smoke] CPU, tiny shapes: times are not meaningful; no CUDA: peak memory, CUDA graphs, FP8 matmuls"
        )
        log("[smoke] (torch._scaled_mm path of our FP8 layers), quantized attention kernels are skipped")
    else:
        torch.backends.cuda.matmul.allow_tf32 = True
    anchors = set(args.anchors.split(",")) if args.anchors else set()
    results: dict = {
        "device": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu (smoke)",
        "torch": torch.__version__,
        "smoke": args.smoke,
        "cases": {},
    }
    for name in args.cases.split(","):
        case = CASES[name]
        cfg = case.config(args.smoke)
        n_img, n_txt = case.tokens(args.smoke)
        x = inputs(cfg, n_img, n_txt, dev)
        row: dict = {"image_tokens": n_img, "text_tokens": n_txt}
        results["cases"][name] = row
        run_ours(case, cfg, x, dev, args, row)
        if "diffusers" in anchors and not case.fp8:
            try:
                run_diffusers(case, cfg, x, dev, args, row)
            except Exception as exc:  # noqa: BLE001 - an anchor that cannot run is reported
                row["diffusers"] = {"skipped": f"{type(exc).__name__}: {str(exc)[:200]}"}
                print_row(name, "diffusers", row["diffusers"])
        del x
        free(dev)
        with_ck = [
            w
            for w, a in (("bf16", "comfyui"), ("compile", "comfyui-compile"))
            if a in anchors and not case.fp8
        ]
        if case.fp8 and "comfyui-fp8" in anchors:
            with_ck += ["fp8", "fp8-noscale"]
        run_comfy(case, args, row, True, with_ck)
        if "comfyui-nokitchen" in anchors and not case.fp8:
            run_comfy(case, args, row, False, ["bf16"])
    if args.numerics or args.smoke:
        results["numerics"] = numerics(args, dev)
    if args.lora:
        import lora_bench  # same folder

        results["lora"] = lora_bench.run(["--parts", "resident,anchor"] + (["--smoke"] if args.smoke else []))
    summarize(results)
    log(json.dumps(results))


if __name__ == "__main__":
    main()
