"""Quantized FLUX.2 [dev] benchmark: Q8_0, a Q4_K_M-like mix, FP8, NVFP4 and bf16, resident and streamed.

A script, not a test. Full-size [dev] on random weights in each format, at 1024^2 with 512 text
tokens. For each format and budget (resident, then 24, 12 and 8 GiB) it prints the steady step,
the bound max(resident step of that format, stored streamed bytes / pinned copy bandwidth measured
in this run), their ratio, the first step, peak VRAM, pinned host bytes and whether the streamed
output equals the resident one bit for bit. Then, in the same run, the anchors:

- ComfyUI-GGUF's loader with ComfyUI's partial loading on the same Q4_K_M GGUF at the same budgets;
- ComfyUI's native fp8mixed path (comfy-kitchen where installed) on the same fp8mixed file.

The GGUF and fp8mixed formats go through real files (written once into ``--workdir``, streamed tensor
by tensor: about 18 GB for Q4_K_M, 34 GB for Q8_0 and FP8; each is deleted after its run), loaded by
``flux2_core.load_transformer`` and by the anchors from the same bytes. NVFP4 and bf16 are built in
memory. Everything ends with a table and a JSON line of all figures.

    python tests/benchmarks/quantized.py --formats Q4_K_M       # one format (and its anchor) per command:
                                                                # each fits the lent GPU's 10-minute limit
    python tests/benchmarks/quantized.py --small                # quarter-width model: checks the GPU path
    python tests/benchmarks/quantized.py --smoke                # tiny shapes on the CPU: checks the script
    python tests/benchmarks/quantized.py --parts decode         # GGUF decode micro-benchmark only
                                                                # (gguf_decode.py; GB/s per type and decoder)
    python tests/benchmarks/quantized.py --decoder torch        # GGUF layers through the torch decoders

GGUF layers decode with the decoder ``--decoder`` names (default "auto": Triton on CUDA, see
``flux2_core/quant/ggml.py``); each format's lines say which decoders really ran ("ran ...").

On the lent GPU (carry ``.whl``, ``.device_comfy`` and ``.device_quant``; see prepare_quantized.sh):
``source tests/benchmarks/device_setup.sh; source tests/benchmarks/quantized_setup.sh;
python3 tests/benchmarks/quantized.py``.

Budgets are GiB of the whole forward pass (weights, ring, activations): the streamer gets the budget
minus the activation peak measured in the resident run minus 384 MiB. In ``--smoke`` mode budgets
may also be fractions of the model's stored bytes ("0.5x").
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import math
import os
import statistics
import sys
import time

os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")

import torch  # noqa: E402
from torch import nn  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from gguf_decode import TYPES, decoders_for, run_decode_bench  # noqa: E402

from flux2_core import Flux2Config, Flux2Transformer, load_transformer  # noqa: E402
from flux2_core.config import bfl_shapes, is_block_linear  # noqa: E402
from flux2_core.quant import FP8Linear, NVFP4Linear, QuantLinear, format_quant_summary, quantize_fp8  # noqa: E402
from flux2_core.quant import ggml as ggml_mod  # noqa: E402
from flux2_core.quant.formats import fp8_format, nvfp4_format  # noqa: E402
from flux2_core.quant.swap import swap_linears  # noqa: E402
from flux2_core.tiny.gguf import write_tiny_gguf_transformer  # noqa: E402
from flux2_core.tiny.transformer import tiny_config  # noqa: E402
from weight_streaming import StreamingConfig, WeightStreamer, measure_block_seconds, measure_link_bandwidth  # noqa: E402
from weight_streaming.config import UNLIMITED  # noqa: E402

GiB = 1 << 30
FORMATS = ("bf16", "fp8", "nvfp4", "Q8_0", "Q4_K_M")


def log(*a) -> None:
    print(*a, flush=True)


# ------------------------------------------------------------------------------------- set-up
def config_for(mode: str) -> Flux2Config:
    if mode == "smoke":
        return tiny_config("dev", depth=2, depth_single=2)
    cfg = Flux2Config.from_name("dev")
    return cfg.replace(variant="custom", hidden_size=1536, num_heads=12) if mode == "small" else cfg


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def make_inputs(cfg: Flux2Config, side: int, n_txt: int, device: torch.device) -> dict:
    h = w = side // 16
    g = torch.Generator(device="cpu").manual_seed(1)
    img = torch.randn(1, h * w, 128, generator=g).to(device, torch.bfloat16)
    txt = torch.randn(1, n_txt, cfg.context_dim, generator=g).to(device, torch.bfloat16)
    hh, ww = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    img_ids = torch.stack([torch.zeros_like(hh), hh, ww, torch.zeros_like(hh)], -1).reshape(1, -1, 4)
    txt_ids = torch.zeros(1, n_txt, 4, dtype=torch.long)
    txt_ids[..., 3] = torch.arange(n_txt)
    return dict(
        img=img,
        img_ids=img_ids.to(device),
        txt=txt,
        txt_ids=txt_ids.to(device),
        timesteps=torch.full((1,), 0.7, device=device),
        guidance=torch.full((1,), 4.0, device=device),
    )


def timed_steps(fn, steps: int, device: torch.device | None = None) -> list[float]:
    device = device or DEVICE
    out = []
    with torch.inference_mode():
        for _ in range(steps):
            sync(device)
            t = time.perf_counter()
            y = fn()
            sync(device)
            out.append(time.perf_counter() - t)
            del y
    return out


# --------------------------------------------------------------------------- models per format
def _random_fill(model: nn.Module, device: torch.device, fill) -> None:
    """Materialise a meta model one top-level piece at a time: ``fill(name, module)`` makes each
    parameter's values on ``device``; they end in ordinary host memory (what a loader hands over)."""
    g = torch.Generator(device=device).manual_seed(0)
    for mod_name, mod in model.named_modules():
        for pname, p in list(mod.named_parameters(recurse=False)):
            value = fill(f"{mod_name}.{pname}" if mod_name else pname, mod, p, g)
            setattr(mod, pname, nn.Parameter(value.to("cpu"), requires_grad=False))
    sync(device)


def _dense_value(name, mod, p, g, device):
    if p.dim() < 2:
        return torch.ones(p.shape, dtype=p.dtype, device=device) + 0.01 * torch.randn(
            p.shape, generator=g, device=device, dtype=p.dtype
        )
    return (torch.randn(p.shape, generator=g, device=device, dtype=torch.float32) / math.sqrt(p.shape[1])).to(
        p.dtype
    )


def build_bf16(cfg: Flux2Config, device: torch.device) -> nn.Module:
    with torch.device("meta"):
        model = Flux2Transformer(cfg, dtype=torch.bfloat16)
    _random_fill(model, device, lambda n, m, p, g: _dense_value(n, m, p, g, device))
    model.checkpoint_format, model.quant_summary = "bf16 (in memory)", {"BF16": 1.0}
    return model.eval()


def _block_linears(model: nn.Module) -> list[str]:
    return [k[: -len(".weight")] for k in bfl_shapes(model.config) if is_block_linear(k)]


def build_nvfp4(cfg: Flux2Config, device: torch.device) -> nn.Module:
    """NVFP4 block linears (random packed codes, e4m3 block scales near 1), bf16 elsewhere, as in the
    published NVFP4 files."""
    with torch.device("meta"):
        model = Flux2Transformer(cfg, dtype=torch.bfloat16)
    swap_linears(model, dict.fromkeys(_block_linears(model), nvfp4_format()))

    def fill(name, mod, p, g):
        if isinstance(mod, NVFP4Linear):
            if name.endswith(".weight"):
                return torch.randint(0, 256, p.shape, generator=g, device=device, dtype=torch.uint8)
            if name.endswith(".weight_scale"):
                return (0.5 + torch.rand(p.shape, generator=g, device=device)).to(torch.float8_e4m3fn)
            return torch.tensor(0.1 / math.sqrt(mod.in_features), device=device)  # weight_scale_2
        return _dense_value(name, mod, p, g, device)

    _random_fill(model, device, fill)
    model.checkpoint_format = "nvfp4 (in memory)"
    packed = sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, NVFP4Linear))
    total = sum(math.prod(s) for s in bfl_shapes(cfg).values())
    model.quant_summary = {"NVFP4": packed / total, "BF16": 1 - packed / total}
    return model.eval()


def write_fp8mixed(cfg: Flux2Config, device: torch.device, path: str) -> str:
    """A ComfyUI-style fp8mixed file: fp8 block linears with per-tensor weight_scale, static input_scale
    and ``comfy_quant`` markers, bf16 elsewhere, ``model.diffusion_model.`` prefix."""
    from safetensors.torch import save_file

    with torch.device("meta"):
        model = Flux2Transformer(cfg, dtype=torch.bfloat16)
    layers = set(_block_linears(model))
    swap_linears(model, dict.fromkeys(layers, fp8_format(input_scale=True)))
    state: dict[str, torch.Tensor] = {}
    g = torch.Generator(device=device).manual_seed(0)
    marker = torch.tensor(list(json.dumps({"format": "float8_e4m3fn"}).encode()), dtype=torch.uint8)
    for name, mod in model.named_modules():
        if isinstance(mod, FP8Linear):
            w = torch.randn(mod.out_features, mod.in_features, generator=g, device=device) / math.sqrt(
                mod.in_features
            )
            q, s = quantize_fp8(w)
            state[f"{name}.weight"], state[f"{name}.weight_scale"] = q.cpu(), s.cpu()
            state[f"{name}.input_scale"] = torch.tensor(0.05)
            state[f"{name}.comfy_quant"] = marker.clone()
            continue
        for pname, p in mod.named_parameters(recurse=False):
            state[f"{name}.{pname}" if name else pname] = _dense_value(name, mod, p, g, device).cpu()
    save_file({"model.diffusion_model." + k: v.contiguous() for k, v in state.items()}, path)
    return path


# --------------------------------------------------------------------------------- measurements
def stored_bytes(model: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def run_budget(model, inputs, label, weights_budget, steps, bw, block_seconds, resident, device):
    gc.collect()
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    cfg = StreamingConfig(vram_budget=weights_budget, block_seconds=block_seconds, link_bandwidth=bw)
    t0 = time.perf_counter()
    ws = WeightStreamer(model, cfg, device)
    plan = ws.attach()
    sync(device)
    attach_s = time.perf_counter() - t0
    extra = None
    if resident is None:  # the resident run also measures per-block compute times for the planner
        with torch.inference_mode():
            extra = measure_block_seconds(model, lambda: model(**inputs))
    times = timed_steps(lambda: model(**inputs), steps, device)
    with torch.inference_mode():
        out = model(**inputs).float().cpu()
    tel = ws.telemetry(sync=True)
    peak = torch.cuda.max_memory_reserved() / GiB if cuda else None
    ws.detach()
    steady = statistics.median(times[1:]) if len(times) > 1 else times[0]
    resident_step = steady if resident is None else resident["steady_s"]
    bound = max(resident_step, plan.streamed_bytes / bw) if bw else resident_step
    row = dict(
        budget=label,
        resident_blocks=len(plan.resident_indices),
        streamed_blocks=len(plan.streamed_indices),
        streamed_gib=plan.streamed_bytes / GiB,
        steady_s=steady,
        first_s=times[0],
        bound_s=bound,
        ratio=steady / bound,
        peak_vram_gib=peak,
        pinned_gib=tel.pinned_bytes / GiB,
        attach_s=attach_s,
        same_as_resident=True if resident is None else bool(torch.equal(out, resident["out"])),
        steps=[round(t, 4) for t in times],
        plan="".join("R" if r else "." for r in plan.resident),
    )
    return row, out, extra


def parse_budget(token: str, model_bytes: int, act_bytes: int) -> int:
    if token.endswith("x"):
        return int(float(token[:-1]) * model_bytes)
    return int(float(token) * GiB - max(act_bytes, 0) - (384 << 20))


def run_format(name, model, inputs, budgets, steps, bw, device) -> tuple[list[dict], torch.Tensor]:
    model_bytes = stored_bytes(model)
    quant = [m for m in model.modules() if isinstance(m, QuantLinear)]
    mix = format_quant_summary(getattr(model, "quant_summary", {}) or {})
    log(
        f"[{name}] {model_bytes / GiB:.2f} GiB stored ({8 * model_bytes / sum(p.numel() for p in model.parameters()):.2f} "
        f"bits per stored value), {len(quant)} quantized layers, mix {mix or '-'}"
    )
    rows, resident, block_seconds, act = [], None, None, 0
    for b in budgets:
        if b == "all":
            row, out, block_seconds = run_budget(
                model, inputs, "all", UNLIMITED, steps, bw, None, None, device
            )
            resident = dict(steady_s=row["steady_s"], out=out)
            if row["peak_vram_gib"] is not None:
                act = int(row["peak_vram_gib"] * GiB) - model_bytes
        else:
            if resident is None:
                raise SystemExit("budgets must start with 'all' (the resident run gives the bound)")
            weights_budget = parse_budget(b, model_bytes, act)
            row, _, _ = run_budget(
                model, inputs, b, weights_budget, steps, bw, block_seconds, resident, device
            )
        row["format"] = name
        row["stored_gib"] = model_bytes / GiB
        rows.append(row)
        peak = "n/a" if row["peak_vram_gib"] is None else f"{row['peak_vram_gib']:.2f} GiB"
        log(
            f"[{name}] {row['budget']:>6}: steady {row['steady_s']:.4f} s, bound {row['bound_s']:.4f} s, ratio "
            f"{row['ratio']:.3f}, first {row['first_s']:.4f} s, peak VRAM {peak}, pinned {row['pinned_gib']:.2f} GiB, "
            f"streamed {row['streamed_gib']:.2f} GiB ({row['streamed_blocks']} blocks), bit-exact "
            f"{row['same_as_resident']}, attach {row['attach_s']:.1f} s"
        )
    return rows, resident["out"]


# ------------------------------------------------------------------------------------------ main
DEVICE = torch.device("cpu")


def main() -> None:
    global DEVICE
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--smoke", action="store_true", help="tiny shapes on the CPU: checks the script end to end"
    )
    ap.add_argument("--small", action="store_true", help="quarter-width [dev] on the GPU")
    ap.add_argument("--formats", default=",".join(FORMATS))
    ap.add_argument("--budgets", default=None, help="'all' first, then GiB (or '0.5x' of the stored bytes)")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--workdir", default=None, help="where the GGUF / fp8mixed files are written")
    ap.add_argument("--no-anchors", action="store_true")
    ap.add_argument(
        "--decoder",
        choices=ggml_mod.DECODERS,
        default=None,
        help="GGUF decoder for the steps (sets FLUX2LOCAL_GGUF_DECODER; default: the environment's, else auto)",
    )
    ap.add_argument("--compile-dequant", action="store_true", help="the same as --decoder compile")
    ap.add_argument(
        "--parts",
        default="steps",
        help="comma list: 'steps' (formats x budgets), 'decode' (GGUF decode micro-benchmark)",
    )
    ap.add_argument("--decode-types", default=",".join(TYPES), help="GGML types of the decode part")
    ap.add_argument("--decode-decoders", default=None, help="decoders of the decode part (default: all here)")
    args = ap.parse_args()
    if args.compile_dequant:
        args.decoder = "compile"
    if args.decoder:
        os.environ[ggml_mod.ENV_DECODER] = args.decoder
    parts = set(args.parts.split(","))
    if not parts <= {"steps", "decode"}:
        raise SystemExit(f"--parts: choose from steps, decode (got {args.parts})")
    logging.basicConfig(level=logging.WARNING, format="  (%(name)s) %(message)s", stream=sys.stdout)
    mode = "smoke" if args.smoke else "small" if args.small else "full"
    if mode != "smoke" and not torch.cuda.is_available():
        raise SystemExit("this benchmark needs a CUDA device (or --smoke for the CPU check)")
    DEVICE = torch.device("cuda", torch.cuda.current_device()) if mode != "smoke" else torch.device("cpu")
    budgets = (args.budgets or ("all,0.9x,0.7x" if mode == "smoke" else "all,24,12,8")).split(",")
    steps = args.steps or (3 if mode == "smoke" else 5)
    # Never $OUT: what is written there is copied back (tens of GB here).
    workdir = args.workdir or "/tmp/flux2local-quantized"
    os.makedirs(workdir, exist_ok=True)
    cfg = config_for(mode)
    side, n_txt = (64, 16) if mode == "smoke" else (512, 512) if mode == "small" else (1024, 512)
    inputs = make_inputs(cfg, side, n_txt, DEVICE)
    figures: dict = dict(
        mode=mode,
        device=str(DEVICE),
        torch=torch.__version__,
        side=side,
        text_tokens=n_txt,
        decoder_requested=ggml_mod.requested_decoder(),
        parts=sorted(parts),
    )
    if DEVICE.type == "cuda":
        figures["gpu"] = torch.cuda.get_device_name(DEVICE)
        figures["capability"] = list(torch.cuda.get_device_capability(DEVICE))
    bw = measure_link_bandwidth(DEVICE, 1 << 30) if DEVICE.type == "cuda" else None
    figures["pinned_h2d_gbps"] = bw / 1e9 if bw else None
    log(
        f"[setup] {mode}: {DEVICE}, model hidden {cfg.hidden_size}, {side}^2, pinned H2D "
        + (f"{bw / 1e9:.1f} GB/s" if bw else "n/a")
    )

    if "decode" in parts:
        decoders = (args.decode_decoders or ",".join(decoders_for(DEVICE))).split(",")
        figures["decode"] = run_decode_bench(
            DEVICE, mode == "smoke", args.decode_types.split(","), decoders, log
        )
        if "steps" not in parts:
            print(json.dumps(figures, default=str), flush=True)
            return

    rows: list[dict] = []
    anchors: dict = {}
    resident_steps: dict[str, float] = {}
    for fmt in args.formats.split(","):
        t0 = time.perf_counter()
        file = None
        if fmt == "bf16":
            model = build_bf16(cfg, DEVICE)
        elif fmt == "nvfp4":
            model = build_nvfp4(cfg, DEVICE)
        elif fmt == "fp8":
            file = write_fp8mixed(cfg, DEVICE, os.path.join(workdir, "flux2_dev_fp8mixed.safetensors"))
            model = load_transformer(file, dtype=torch.bfloat16, keep_fp8=True)
        else:  # a GGUF mix, through a real file
            file = str(
                write_tiny_gguf_transformer(
                    os.path.join(workdir, f"flux2-dev-{fmt}.gguf"), "dev", mix=fmt, config=cfg
                )
            )
            model = load_transformer(file, dtype=torch.bfloat16)
        build_s = time.perf_counter() - t0
        log(
            f"[{fmt}] built in {build_s:.1f} s"
            + (f" ({os.path.getsize(file) / 1e9:.1f} GB file)" if file else "")
        )
        calls_before = dict(ggml_mod.DECODER_CALLS)
        fmt_rows, ours_out = run_format(fmt, model, inputs, budgets, steps, bw, DEVICE)
        ran = {k: v - calls_before.get(k, 0) for k, v in ggml_mod.DECODER_CALLS.items()}
        ran = {k: v for k, v in ran.items() if v}
        if ran:
            log(f"[{fmt}] GGUF layer decodes by decoder: {ran}")
        for r in fmt_rows:
            r["build_s"] = build_s
            r["decoders_ran"] = sorted(ran)
        rows += fmt_rows
        resident_steps[fmt] = fmt_rows[0]["steady_s"]
        model = None  # noqa: F841 - free host RAM before the anchor
        gc.collect()
        if file and not args.no_anchors and fmt in ("Q4_K_M", "fp8"):
            from quantized_anchors import comfy_anchor

            # ComfyUI's apply_model returns the denoised latent: x - sigma * velocity.
            x0 = (inputs["img"].float().cpu() - inputs["timesteps"].float().cpu() * ours_out).to(
                torch.float32
            )
            kind = "gguf" if fmt != "fp8" else "fp8"
            anchors[fmt] = comfy_anchor(
                kind,
                file,
                ROOT,
                budgets,
                inputs,
                steps,
                bw,
                resident_steps[fmt],
                timed_steps,
                log,
                DEVICE,
                x0,
            )
            if "skipped" in anchors[fmt]:
                log(f"[comfyui-{kind}] skipped: {anchors[fmt]['skipped']}")
        if file and mode != "smoke":
            os.remove(file)  # tens of GB: one file on disk at a time

    log("")
    log(
        "| format | budget | stored GiB | steady s | bound s | ratio | first s | peak VRAM GiB | pinned GiB | bit-exact |"
    )
    log("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        peak = "-" if r["peak_vram_gib"] is None else f"{r['peak_vram_gib']:.2f}"
        log(
            f"| {r['format']} | {r['budget']} | {r['stored_gib']:.2f} | {r['steady_s']:.4f} | {r['bound_s']:.4f} | "
            f"{r['ratio']:.3f} | {r['first_s']:.4f} | {peak} | {r['pinned_gib']:.2f} | {r['same_as_resident']} |"
        )
    for fmt, a in anchors.items():
        for r in a.get("rows", []):
            if "steady_s" in r:
                peak = "-" if r["peak_vram_gib"] is None else f"{r['peak_vram_gib']:.2f}"
                log(
                    f"| ComfyUI {fmt} | {r['budget']} | {a['model_gib']:.2f} | {r['steady_s']:.4f} | {r['bound_s']:.4f} | "
                    f"{r['ratio']:.3f} | {r['first_s']:.4f} | {peak} | {r['pinned_gib']:.2f} | - |"
                )
    goals = goal_figures(rows, anchors)
    log("")
    for k, v in goals.items():
        log(f"[goal] {k}: {v}")
    figures.update(ours=rows, anchors=anchors, goals=goals)
    print(json.dumps(figures, default=str), flush=True)


def goal_figures(rows: list[dict], anchors: dict) -> dict:
    """The issue's targets as ratios (None where this run lacks a figure)."""
    by = {(r["format"], r["budget"]): r for r in rows}

    def step(fmt, budget):
        r = by.get((fmt, budget))
        return None if r is None else r["steady_s"]

    def ratio(a, b):
        return None if a is None or b is None else a / b

    comfy_q4 = {r["budget"]: r for r in anchors.get("Q4_K_M", {}).get("rows", []) if "steady_s" in r}
    twelve = "12"
    out = {
        "max_streamed_ratio_to_bound": max((r["ratio"] for r in rows if r["budget"] != "all"), default=None),
        "q4k_12gib_speedup_over_bf16_12gib": ratio(step("bf16", twelve), step("Q4_K_M", twelve)),
        "q4k_12gib_speedup_over_comfyui_gguf": ratio(
            comfy_q4.get(f"{twelve} GiB", {}).get("steady_s"), step("Q4_K_M", twelve)
        ),
        "q8_resident_over_bf16_resident": ratio(step("Q8_0", "all"), step("bf16", "all")),
        "q4k_resident_over_bf16_resident": ratio(step("Q4_K_M", "all"), step("bf16", "all")),
        "all_streamed_bit_exact": all(r["same_as_resident"] for r in rows),
    }
    nv, bf = by.get(("nvfp4", "all")), by.get(("bf16", "all"))
    if nv and bf:
        out["nvfp4_stored_over_bf16"] = nv["stored_gib"] / bf["stored_gib"]
        if nv["peak_vram_gib"] is not None:
            out["nvfp4_resident_vram_over_bf16"] = nv["peak_vram_gib"] / bf["peak_vram_gib"]
        nv_s = [r["pinned_gib"] for r in rows if r["format"] == "nvfp4" and r["budget"] != "all"]
        bf_s = [r["pinned_gib"] for r in rows if r["format"] == "bf16" and r["budget"] != "all"]
        if nv_s and bf_s and max(bf_s) > 0:
            out["nvfp4_pinned_over_bf16"] = max(nv_s) / max(bf_s)
    return out


if __name__ == "__main__":
    main()
