"""Weight streaming benchmark: full-size FLUX.2 (random weights) on one GPU: [dev] bf16 at 1024^2 by
default, [dev] FP8 (`--fp8`), [klein] 4B (`--variant klein-4b`, at `--side 512` or 1024).

A script, not a test. For each VRAM budget (all resident, then 40/24/16/8 GiB) it attaches
`weight_streaming.WeightStreamer` to the model, runs a few forward passes and prints the steady step
time, the bound max(resident step, streamed bytes / pinned copy bandwidth measured in this run), their
ratio, the first step, peak VRAM, pinned host bytes and attach time. Then the anchors on the same
shapes: diffusers' group offload (block level, one block a group, use_stream=True,
`diffusers_streaming.py`) and, where a ComfyUI tree can be imported, ComfyUI's own FLUX.2 model with
its partial loading at the same budgets (`comfy_streaming.py`, which says how to set up the tree on the
device machine). The last line is a JSON object of all figures.

    python tests/benchmarks/streaming.py                 # the full run (about 60 GiB of host RAM)
    python tests/benchmarks/streaming.py --small         # a 1/4-width model, to check the script
    python tests/benchmarks/streaming.py --block-times estimated --budgets all,24,16
                                                         # plans from FLOP estimates, not measured times
    python tests/benchmarks/streaming.py --fp8 --block-times estimated --budgets all,24,12
                                                         # FP8 [dev] (planner: FP8 probe, stored bytes)
    python tests/benchmarks/streaming.py --variant klein-4b --side 512 --budgets all,4,2
    python tests/benchmarks/streaming.py --smoke         # CPU, tiny model: checks the script

FP8 (`--fp8`): every block linear is flux2_core's FP8Linear (E4M3 weights, per-tensor scale, static
input scale), so blocks stream as stored (one byte a weight) and the estimated plans use the FP8 matmul
probe where the GPU has FP8 tensor cores. `--fast-path` sets `Flux2Transformer.fast_path` ("auto", what
users get: compiled block stages on CUDA with Triton; "eager" for the reference blocks); the first
step at each budget then includes no compile time (compiled once in the resident run).

Planner timing input: with `--block-times measured` (default) the budgets after "all" get the block times
measured in the resident run; with `estimated` they get `flux2_core.block_flops` per block instead, which
the streamer turns into times with its matmul probe (what a card that cannot hold the model does), and
the script prints whether that plan equals the measured-times plan (running the latter too when not).

Budgets are GiB (2^30 bytes). A budget covers everything the forward pass allocates on the device
(weights, ring and activations): the streamer gets the budget minus the activation peak measured in the
resident run minus a 384 MiB margin. Before any measurement, one untimed forward pass of two blocks
warms up the CUDA libraries (cuBLAS handles, attention kernels) so that the first-step figures measure
streaming, not process start-up.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import statistics
import sys
import time

# Segments that grow in place keep reserved VRAM close to allocated VRAM, so a budget holds for the
# process as a whole (set before torch initialises CUDA; an explicit setting wins).
os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")

import torch  # noqa: E402
from torch import nn  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

from weight_streaming import (  # noqa: E402
    StreamingConfig,
    Timing,
    WeightStreamer,
    measure_block_seconds,
    measure_link_bandwidth,
    measure_matmul_flops,
    plan_residency,
)
from weight_streaming.config import UNLIMITED  # noqa: E402

GiB = 1 << 30
DEV = torch.device("cuda")  # main() sets the CPU for --smoke
SMOKE_BANDWIDTH = 1e9  # --smoke: no host-to-device link to measure; an assumed 1 GB/s
BUDGETS_DEFAULT = "all,40,24,16,8"


def _cuda() -> bool:
    return DEV.type == "cuda"


def _sync() -> None:
    if _cuda():
        torch.cuda.synchronize()


def _empty_cache() -> None:
    if _cuda():
        torch.cuda.empty_cache()


def log(*a) -> None:
    print(*a, flush=True)


# --------------------------------------------------------------------------- models
class _StandInDouble(nn.Module):
    """Fallback with FLUX.2 double-block shapes (used only if flux2_core cannot be imported)."""

    def __init__(self, H: int, M: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        for s in ("img", "txt"):
            setattr(self, f"{s}_qkv", nn.Linear(H, 3 * H, bias=False))
            setattr(self, f"{s}_proj", nn.Linear(H, H, bias=False))
            setattr(self, f"{s}_mlp0", nn.Linear(H, 2 * M, bias=False))
            setattr(self, f"{s}_mlp2", nn.Linear(M, H, bias=False))

    def forward(self, img, txt):
        n_txt = txt.shape[1]
        qkv = torch.cat([self.txt_qkv(txt), self.img_qkv(img)], 1).unflatten(-1, (3, self.heads, -1))
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        a = nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)
        txt = txt + self.txt_proj(a[:, :n_txt])
        img = img + self.img_proj(a[:, n_txt:])
        for s, x in (("img", img), ("txt", txt)):
            h = getattr(self, f"{s}_mlp0")(x)
            h = nn.functional.silu(h[..., : h.shape[-1] // 2]) * h[..., h.shape[-1] // 2 :]
            x = x + getattr(self, f"{s}_mlp2")(h)
            img, txt = (x, txt) if s == "img" else (img, x)
        return img, txt


class _StandInSingle(nn.Module):
    def __init__(self, H: int, M: int, heads: int) -> None:
        super().__init__()
        self.H, self.M, self.heads = H, M, heads
        self.linear1 = nn.Linear(H, 3 * H + 2 * M, bias=False)
        self.linear2 = nn.Linear(H + M, H, bias=False)

    def forward(self, x):
        qkv, h = self.linear1(x).split([3 * self.H, 2 * self.M], -1)
        q, k, v = qkv.unflatten(-1, (3, self.heads, -1)).permute(2, 0, 3, 1, 4)
        a = nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)
        h = nn.functional.silu(h[..., : self.M]) * h[..., self.M :]
        return x + self.linear2(torch.cat([a, h], -1))


class StandInFlux2(nn.Module):
    streamable_blocks = ("double_blocks", "single_blocks")

    def __init__(self, H=6144, heads=48, depth=8, depth_single=48, ctx=15360) -> None:
        super().__init__()
        M = 3 * H
        self.img_in = nn.Linear(128, H, bias=False)
        self.txt_in = nn.Linear(ctx, H, bias=False)
        self.modulation = nn.Linear(H, 15 * H, bias=False)
        self.double_blocks = nn.ModuleList(_StandInDouble(H, M, heads) for _ in range(depth))
        self.single_blocks = nn.ModuleList(_StandInSingle(H, M, heads) for _ in range(depth_single))
        self.final = nn.Linear(H, 128, bias=False)

    def forward(self, *, img, img_ids, txt, txt_ids, timesteps, guidance=None):
        img, txt = self.img_in(img), self.txt_in(txt)
        for b in self.double_blocks:
            img, txt = b(img, txt)
        x = torch.cat([txt, img], 1)
        for b in self.single_blocks:
            x = b(x)
        return self.final(x[:, txt.shape[1] :])


def build_ours(small: bool, variant: str = "dev", smoke: bool = False):
    """FLUX.2 from flux2_core on the meta device (falls back to the stand-in, saying why)."""
    try:
        from flux2_core import Flux2Config, Flux2Transformer

        cfg = Flux2Config.from_name(variant)
        if small:
            cfg = cfg.replace(hidden_size=cfg.hidden_size // 4, num_heads=cfg.num_heads // 4)
        if smoke:
            cfg = cfg.replace(
                variant="custom", hidden_size=256, num_heads=2, depth=2, depth_single=4, context_dim=64
            )
        with torch.device("meta"):
            model = Flux2Transformer(cfg, dtype=torch.bfloat16)
        return model, f"flux2_core.Flux2Transformer ({variant})", cfg.context_dim, cfg
    except Exception as exc:  # noqa: BLE001 - any import/config problem: say it and use the stand-in
        log(f"[model] flux2_core unavailable ({type(exc).__name__}: {exc}); using the stand-in block stack")
        H = 1536 if small else 6144
        with torch.device("meta"):
            model = StandInFlux2(H=H, heads=H // 128).to(torch.bfloat16)
        return model, "stand-in (FLUX.2 [dev] shapes)", 15360, None


def to_fp8(model: nn.Module) -> None:
    """Every block linear of a materialized model becomes an FP8Linear (E4M3, per-tensor weight scale,
    static input scale), quantized on the device one layer at a time and kept where the weight was."""
    from flux2_core.config import is_block_linear
    from flux2_core.quant import FP8Linear, quantize_fp8

    names = [n[: -len(".weight")] for n, _ in model.named_parameters() if is_block_linear(n)]
    for name in names:
        old = model.get_submodule(name)
        home = old.weight.device
        new = FP8Linear(old.in_features, old.out_features, True, device=home)
        q, scale = quantize_fp8(old.weight.data.to(DEV))
        new.weight.data = q.to(home)
        new.weight_scale = scale.to(home)
        new.input_scale = torch.tensor(0.05, device=home)
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent), attr, new)
        del old, q
    _sync()
    _empty_cache()


def materialize_random(model: nn.Module, pinned: bool = False) -> float:
    """Random bf16 weights made on the GPU, one top-level piece at a time, then moved to host RAM.

    `pinned=False` leaves them in ordinary pageable memory (what a loader hands over); the copy goes
    through a reusable pinned staging buffer, which is several times faster than a pageable download.
    `pinned=True` puts each weight in its own pinned allocation (used for the diffusers anchor, whose
    group offload would otherwise keep a pageable and a pinned copy of all 60 GiB at once).
    """
    t0 = time.perf_counter()
    pieces = []
    for _name, child in model.named_children():
        pieces += list(child) if isinstance(child, nn.ModuleList) else [child]
    g = torch.Generator(device=DEV).manual_seed(0)
    staging = None if pinned or not _cuda() else torch.empty(GiB, dtype=torch.uint8, pin_memory=True)
    for piece in pieces:
        piece.to_empty(device=DEV)
        with torch.no_grad():
            for p in piece.parameters():
                if p.dim() >= 2:
                    p.normal_(0.0, 0.02, generator=g)
                else:
                    p.fill_(1.0)
                if not _cuda():
                    host = p.data  # --smoke: already in host memory
                elif pinned:
                    host = torch.empty(p.shape, dtype=p.dtype, pin_memory=True)
                    host.copy_(p)
                else:
                    stage = staging[: p.nbytes].view(p.dtype).view(p.shape)
                    stage.copy_(p)
                    host = torch.empty(p.shape, dtype=p.dtype).copy_(stage)
                p.data = host
        piece.to("cpu")  # buffers, if any
    _sync()
    del staging
    _empty_cache()
    return time.perf_counter() - t0


def host_available_gib() -> float:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / (1 << 20)
    return float("nan")


def make_inputs(ctx: int, side: int = 1024, n_txt: int = 512):
    h = w = side // 16
    g = torch.Generator(device=DEV).manual_seed(1)
    img = torch.randn(1, h * w, 128, device=DEV, dtype=torch.bfloat16, generator=g)
    txt = torch.randn(1, n_txt, ctx, device=DEV, dtype=torch.bfloat16, generator=g)
    hh, ww = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    img_ids = torch.stack([torch.zeros_like(hh), hh, ww, torch.zeros_like(hh)], -1).reshape(1, -1, 4)
    txt_ids = torch.zeros(1, n_txt, 4, dtype=torch.long)
    txt_ids[..., 3] = torch.arange(n_txt)
    return dict(
        img=img,
        img_ids=img_ids.to(DEV),
        txt=txt,
        txt_ids=txt_ids.to(DEV),
        timesteps=torch.full((1,), 0.7, device=DEV),
        guidance=torch.full((1,), 4.0, device=DEV),
    )


def timed_steps(fn, steps: int) -> list[float]:
    out = []
    with torch.inference_mode():
        for _ in range(steps):
            _sync()
            t = time.perf_counter()
            y = fn()
            _sync()
            out.append(time.perf_counter() - t)
            del y
    return out


def warm_up(model: nn.Module, inputs: dict) -> None:
    """One untimed pass through the first double and single block on the GPU (library start-up)."""
    sub = [model.double_blocks[0], model.single_blocks[0]]
    saved = {}
    for m in sub:
        for n, p in m.named_parameters():
            saved[(id(m), n)] = p.data
            p.data = p.data.to(DEV)
    try:
        keep_d, keep_s = model.double_blocks, model.single_blocks
        model.double_blocks, model.single_blocks = nn.ModuleList(sub[:1]), nn.ModuleList(sub[1:])
        for n, p in model.named_parameters():
            if not n.startswith(("double_blocks", "single_blocks")):
                saved[(0, n)] = p.data
                p.data = p.data.to(DEV)
        timed_steps(lambda: model(**inputs), 1)
    finally:
        model.double_blocks, model.single_blocks = keep_d, keep_s
        for n, p in model.named_parameters():
            if (0, n) in saved:
                p.data = saved[(0, n)]
        for m in sub:
            for n, p in m.named_parameters():
                p.data = saved[(id(m), n)]
        _empty_cache()


# --------------------------------------------------------------------------- our manager
def run_budget(
    model,
    inputs,
    label,
    weights_budget,
    steps,
    bw,
    block_seconds,
    resident_step,
    extra=None,
    block_flops=None,
    compare_seconds=None,
):
    """One budget of ours. `block_flops` (with block_seconds None) makes the streamer estimate block
    times; `compare_seconds` (measured times) adds whether the measured-times plan would be the same."""
    gc.collect()
    _empty_cache()
    if _cuda():
        torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated() if _cuda() else 0
    cfg = StreamingConfig(
        vram_budget=weights_budget, block_seconds=block_seconds, block_flops=block_flops, link_bandwidth=bw
    )
    t0 = time.perf_counter()
    ws = WeightStreamer(model, cfg, DEV)
    plan = ws.attach()
    _sync()
    load_s = time.perf_counter() - t0
    timing_src = (
        "measured" if block_seconds is not None else "estimated" if block_flops is not None else "none"
    )
    est_sum = sum(ws.timing.block_seconds) if ws.timing is not None else None
    same_as_measured = None
    if compare_seconds is not None and plan.streamed_indices:
        ref = plan_residency(
            plan.block_sizes,
            plan.budget,
            fixed_bytes=plan.fixed_bytes,
            ring_slots=cfg.slots,
            timing=Timing(tuple(compare_seconds), bw),
        )
        same_as_measured = ref.resident == plan.resident and ref.ring_slots == plan.ring_slots
    times = timed_steps(lambda: model(**inputs), steps)
    tel = ws.telemetry(sync=True)
    peak_alloc = torch.cuda.max_memory_allocated() - base if _cuda() else 0
    peak_reserved = torch.cuda.max_memory_reserved() if _cuda() else 0
    extra_out = extra() if extra else None
    ws.detach()
    gc.collect()
    _empty_cache()
    steady = statistics.median(times[1:])
    bound = max(resident_step or steady, plan.streamed_bytes / bw)
    return dict(
        budget=label,
        resident_blocks=len(plan.resident_indices),
        streamed_blocks=len(plan.streamed_indices),
        ring_slots=plan.ring_slots,
        resident_gib=plan.resident_bytes / GiB,
        streamed_gib=plan.streamed_bytes / GiB,
        steady_s=steady,
        first_s=times[0],
        bound_s=bound,
        ratio=steady / bound,
        first_over_steady=times[0] / steady,
        peak_alloc_gib=peak_alloc / GiB,
        peak_reserved_gib=peak_reserved / GiB,
        pinned_gib=tel.pinned_bytes / GiB,
        pinned_over_streamed=(tel.pinned_bytes / plan.streamed_bytes) if plan.streamed_bytes else 0.0,
        pageable_gib=tel.pageable_bytes / GiB,
        load_s=load_s,
        copy_gbps=tel.copy_bandwidth / 1e9,
        stall_s=tel.mean_step_stall_s,
        steps=[round(t, 4) for t in times],
        plan="".join("R" if r else "." for r in plan.resident),
        extra=extra_out,
        timing=timing_src,
        block_seconds_sum=est_sum,
        same_plan_as_measured=same_as_measured,
    )


# --------------------------------------------------------------------------- main
# The anchors live in diffusers_streaming.py and comfy_streaming.py.
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--budgets", default=BUDGETS_DEFAULT, help="GiB, comma separated; 'all' = resident")
    ap.add_argument("--steps", type=int, default=5, help="forward passes per budget (the first is 'first')")
    ap.add_argument("--small", action="store_true", help="quarter-width model: checks the script quickly")
    ap.add_argument("--no-diffusers", action="store_true")
    ap.add_argument("--plain-plan", default="24", help="budgets also run with the byte-only planner")
    ap.add_argument(
        "--block-times",
        choices=("measured", "estimated"),
        default="measured",
        help="planner timing input for the budgets after 'all' (see the module docstring)",
    )
    ap.add_argument(
        "--comfy-budgets", default=None, help="budgets for the ComfyUI anchor (default: --budgets)"
    )
    ap.add_argument("--no-comfyui", action="store_true")
    ap.add_argument(
        "--lora", action="store_true", help="also run lora_bench.py (rank-32 LoRA, streamed at 12 GiB)"
    )
    ap.add_argument("--variant", default="dev", help="dev or klein-4b (any flux2_core preset)")
    ap.add_argument("--fp8", action="store_true", help="FP8 block linears (static input scales)")
    ap.add_argument(
        "--side", type=int, default=None, help="image side in pixels (default 1024; 512 with --small)"
    )
    ap.add_argument("--fast-path", default="auto", help="Flux2Transformer.fast_path: auto, eager, compile")
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny model: check the script")
    args = ap.parse_args()
    global DEV
    if args.smoke:
        DEV = torch.device("cpu")
        args.steps = min(args.steps, 3)
        args.no_diffusers = args.no_comfyui = True
        log(
            "[smoke] CPU, tiny model: no pinned memory, no copy stream, an assumed link bandwidth; times are not"
        )
        log("[smoke] meaningful; the diffusers and ComfyUI anchors need CUDA and are skipped")
    # ComfyUI reports its load decisions ("loaded partially ...") and the streamer its probe via logging.
    logging.basicConfig(level=logging.INFO, format="  (%(name)s) %(message)s", stream=sys.stdout)
    if not args.smoke and not torch.cuda.is_available():
        raise SystemExit("this benchmark needs a CUDA device (or --smoke for a CPU check of the script)")
    figures: dict = dict(
        device=torch.cuda.get_device_name() if _cuda() else "cpu (smoke)",
        torch=torch.__version__,
        variant=args.variant,
        fp8=args.fp8,
    )

    if _cuda():
        bw = measure_link_bandwidth(DEV, 1 << 30)
        log(f"[link] pinned host-to-device copy: {bw / 1e9:.1f} GB/s (1 GiB, 3 copies)")
    else:
        bw = SMOKE_BANDWIDTH
    figures["pinned_h2d_gbps"] = bw / 1e9

    model, model_name, ctx, model_cfg = build_ours(args.small, args.variant, args.smoke)
    build_s = materialize_random(model)
    if args.fp8:
        to_fp8(model)
        model_name += ", FP8 block linears"
    model.eval()
    if hasattr(model, "fast_path"):
        model.fast_path = args.fast_path
    figures["model"] = model_name
    n_params = sum(p.numel() for p in model.parameters())
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    weight_bytes += sum(b.numel() * b.element_size() for b in model.buffers())
    log(
        f"[model] {model_name}: {n_params / 1e9:.2f} B params, {weight_bytes / GiB:.2f} GiB as stored, built in "
        f"{build_s:.1f} s"
    )
    side = args.side or (128 if args.smoke else 512 if args.small else 1024)
    inputs = make_inputs(ctx, side=side, n_txt=16 if args.smoke else 512)
    if args.smoke and args.budgets == BUDGETS_DEFAULT:
        # Budgets of a tiny model: resident, then the fixed weights and a ring of two plus half and a
        # fifth of the blocks' bytes (partly resident plans).
        blocks = [sum(p.nbytes for p in b.parameters()) for b in (*model.double_blocks, *model.single_blocks)]
        base = weight_bytes - sum(blocks) + 2 * max(blocks)
        args.budgets = ",".join(["all"] + [f"{(base + f * sum(blocks)) / GiB:.5f}" for f in (0.5, 0.2)])
    warm_up(model, inputs)
    flops = None
    if args.block_times == "estimated":
        if model_cfg is None:
            raise SystemExit("--block-times estimated needs flux2_core (the stand-in has no FLOP count)")
        from flux2_core import block_flops, tokens_for
        from weight_streaming import block_matmul_dtype

        flops = block_flops(model_cfg, tokens_for(side, side, text_tokens=inputs["txt"].shape[1]))
        # The rate the streamer's estimate uses for these blocks (an FP8 probe for FP8 blocks on FP8 GPUs).
        mm_dtype = block_matmul_dtype(model.single_blocks[0], DEV, torch.bfloat16)
        rate = measure_matmul_flops(DEV, mm_dtype)
        figures["block_flops_total"] = flops.total
        figures["matmul_probe_tflops"] = rate / 1e12
        figures["matmul_probe_dtype"] = str(mm_dtype)
        log(
            f"[estimate] block FLOPs {flops.total:.3e} per step ({flops.attention_fraction:.1%} attention), "
            f"matmul probe {rate / 1e12:.0f} TFLOP/s in {mm_dtype}"
        )

    rows = []
    printed = 0
    resident_step = None
    act_bytes = 0
    block_seconds = None
    for b in args.budgets.split(","):
        if b == "all":

            def per_block():
                with torch.inference_mode():
                    return measure_block_seconds(model, lambda: model(**inputs))

            row = run_budget(model, inputs, "all", UNLIMITED, args.steps, bw, None, None, extra=per_block)
            block_seconds = row.pop("extra")
            resident_step = row["steady_s"]
            row["bound_s"], row["ratio"] = resident_step, 1.0
            # Activation peak = what the forward allocates beyond the resident weights.
            act_bytes = int(row["peak_alloc_gib"] * GiB) - weight_bytes if _cuda() else 0
            if hasattr(model, "fast"):
                figures["fast_path"] = model.fast.status()
                log(f"[fast] {figures['fast_path']}")
            figures["activation_gib"] = act_bytes / GiB
            figures["block_seconds_sum"] = sum(block_seconds)
            if flops is not None:
                eff = flops.total / (figures["matmul_probe_tflops"] * 1e12 * sum(block_seconds))
                figures["measured_flops_efficiency"] = eff
                log(
                    f"[estimate] measured block time {sum(block_seconds):.3f} s: blocks ran at {eff:.2f} of the "
                    f"probe's rate (the estimate assumes {StreamingConfig().flops_efficiency:.2f})"
                )
            rows.append(row)
        else:
            budget = float(b) * GiB
            weights_budget = int(budget - max(act_bytes, 0) - ((384 << 20) if _cuda() else 0))
            if flops is not None:
                r = run_budget(
                    model,
                    inputs,
                    f"{b} GiB est",
                    weights_budget,
                    args.steps,
                    bw,
                    None,
                    resident_step,
                    block_flops=flops.per_block,
                    compare_seconds=block_seconds,
                )
                rows.append(r)
                log(
                    f"[estimate] {b} GiB: estimated block time {r['block_seconds_sum']:.3f} s; plan "
                    f"{'equals' if r['same_plan_as_measured'] else 'differs from'} the measured-times plan"
                )
                if r["same_plan_as_measured"] is False:
                    rows.append(
                        run_budget(
                            model,
                            inputs,
                            f"{b} GiB",
                            weights_budget,
                            args.steps,
                            bw,
                            block_seconds,
                            resident_step,
                        )
                    )
            else:
                rows.append(
                    run_budget(
                        model,
                        inputs,
                        f"{b} GiB",
                        weights_budget,
                        args.steps,
                        bw,
                        block_seconds,
                        resident_step,
                    )
                )
            if b in args.plain_plan.split(","):
                r = run_budget(
                    model, inputs, f"{b} GiB plain", weights_budget, args.steps, bw, None, resident_step
                )
                rows.append(r)
        for r in rows[printed:]:
            log(
                f"[ours] {r['budget']:>12}: steady {r['steady_s']:.3f} s, bound {r['bound_s']:.3f} s, ratio "
                f"{r['ratio']:.3f}, first {r['first_s']:.3f} s ({r['first_over_steady']:.2f}x), peak reserved "
                f"{r['peak_reserved_gib']:.2f} GiB (allocated {r['peak_alloc_gib']:.2f}), pinned {r['pinned_gib']:.1f} "
                f"GiB ({r['pinned_over_streamed']:.3f}x streamed), load {r['load_s']:.1f} s, copy "
                f"{r['copy_gbps']:.1f} GB/s, stall {r['stall_s']:.3f} s, ring {r['ring_slots']}, plan {r['plan']}"
            )
        printed = len(rows)
    figures["ours"] = rows
    log(f"[ours-json] {json.dumps(rows)}")
    model = None  # noqa: F841 - frees ~60 GiB of host RAM before the diffusers anchor
    gc.collect()
    _empty_cache()
    log(f"[host] {host_available_gib():.1f} GiB of host RAM available before the anchors")
    if args.fp8 or args.variant != "dev":
        # The anchors build bf16 [dev]; ComfyUI's streaming of other shapes gets its config below.
        args.no_diffusers = True
        if args.fp8:
            args.no_comfyui = True
            log(
                "[anchors] FP8: no streaming anchor with FP8 weights here (ComfyUI's FP8 path: transformer.py)"
            )

    from diffusers_streaming import diffusers_anchor

    figures["diffusers_group_offload"] = (
        dict(skipped="--no-diffusers")
        if args.no_diffusers
        else diffusers_anchor(
            inputs,
            max(3, args.steps - 2),
            bw,
            resident_step or 0.0,
            args.small,
            materialize_random,
            timed_steps,
        )
    )
    log(f"[diffusers] {figures['diffusers_group_offload']}")
    if args.no_comfyui:
        figures["comfyui"] = dict(skipped="--no-comfyui")
    else:
        from comfy_streaming import comfyui_anchor

        comfy_budgets = (args.comfy_budgets or args.budgets).split(",")
        figures["comfyui"] = comfyui_anchor(
            ROOT,
            comfy_budgets,
            inputs,
            args.steps,
            bw,
            resident_step or 0.0,
            args.small,
            materialize_random,
            timed_steps,
            log,
            model_cfg,
        )
        if "skipped" in figures["comfyui"]:
            log(f"[comfyui] skipped: {figures['comfyui']['skipped']}")

    log("")
    log(
        "| budget | resident/streamed blocks | streamed GiB | steady s | bound s | ratio | first s | first/steady "
        "| peak reserved GiB | pinned GiB (x streamed) | load s |"
    )
    log("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        log(
            f"| {r['budget']} | {r['resident_blocks']}/{r['streamed_blocks']} | {r['streamed_gib']:.1f} | "
            f"{r['steady_s']:.3f} | {r['bound_s']:.3f} | {r['ratio']:.3f} | {r['first_s']:.3f} | "
            f"{r['first_over_steady']:.2f} | {r['peak_reserved_gib']:.2f} | {r['pinned_gib']:.1f} "
            f"({r['pinned_over_streamed']:.3f}) | {r['load_s']:.1f} |"
        )
    d = figures["diffusers_group_offload"]
    if "steady_s" in d:
        log(
            f"| diffusers group offload | 0/56 | {d['streamed_gib']:.1f} | {d['steady_s']:.3f} | {d['bound_s']:.3f} | "
            f"{d['ratio']:.3f} | {d['first_s']:.3f} | {d['first_over_steady']:.2f} | {d['peak_reserved_gib']:.1f} | "
            f"- | {d['load_s']:.1f} |"
        )
    for r in figures["comfyui"].get("rows", []):
        if "steady_s" in r:
            log(
                f"| ComfyUI {r['budget']} | kept {r['kept_gib']:.1f} GiB | {r['streamed_gib']:.1f} | {r['steady_s']:.3f} "
                f"| {r['bound_s']:.3f} | {r['ratio']:.3f} | {r['first_s']:.3f} | {r['first_over_steady']:.2f} | "
                f"{r['peak_reserved_gib']:.2f} | {r['pinned_gib']:.1f} | {r['load_s']:.1f} |"
            )
    log("")
    log(
        "| budget | ours steady s | ours ratio | ComfyUI steady s | ComfyUI ratio | ComfyUI kept GiB | ComfyUI/ours |"
    )
    log("|---|---|---|---|---|---|---|")
    comfy = {r["budget"]: r for r in figures["comfyui"].get("rows", []) if "steady_s" in r}
    for r in rows:
        c = comfy.get(r["budget"].replace(" est", ""))
        if c is None or r["budget"].endswith("plain"):
            continue
        log(
            f"| {r['budget']} | {r['steady_s']:.3f} | {r['ratio']:.3f} | {c['steady_s']:.3f} | {c['ratio']:.3f} | "
            f"{c['kept_gib']:.1f} | {c['steady_s'] / r['steady_s']:.2f}x |"
        )
    if args.lora:
        import lora_bench  # same folder

        figures["lora"] = lora_bench.run(["--parts", "streamed"])
    print(json.dumps(figures), flush=True)


if __name__ == "__main__":
    main()
