"""LoRA benchmark: what a rank-32 LoRA on every block linear costs a FLUX.2 [dev] denoising step.

A script, not a test. Random bf16 weights at the real [dev] shapes, 1024^2 (4096 image tokens) + 512
text tokens, one GPU. Measured in one process:

  resident      base step, step with the LoRA applied on the fly (forward hooks), step with the LoRA
                merged into the weights (and the merge / un-merge time); un-merge must give the base
                output bit for bit, and merged vs on the fly agree within bf16 rounding;
  streamed      the weight streamer at a VRAM budget (default 12 GiB for everything the step
                allocates), base step and step with the LoRA on the fly;
  anchor        diffusers' PEFT LoRA (load_lora_adapter / set_adapters) on its Flux2Transformer2DModel,
                same rank and layers, resident: base and LoRA step.
The goals: on the fly adds <= 3% to the resident step and <= 1% to the streamed one; merged adds 0.

    python tests/benchmarks/lora_bench.py                      # everything
    python tests/benchmarks/lora_bench.py --parts resident     # or streamed, anchor (comma list)
    python tests/benchmarks/lora_bench.py --smoke              # tiny shapes on the CPU: checks the script

Also reachable as a flag of the other scripts (``transformer.py --lora``, ``streaming.py --lora``),
which call ``run()`` and put its figures into their own JSON line. Prints one line per figure, then
(when run itself) a JSON line with every figure.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time

os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")

import torch  # noqa: E402
from torch import nn  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from flux2_core import Flux2Config, Flux2Transformer, apply_loras, block_flops, tokens_for  # noqa: E402
from flux2_core.lora import Flux2LoRA, LowRank, Slot  # noqa: E402
from flux2_core.tiny.lora import lora_targets  # noqa: E402
from flux2_core.tiny.transformer import tiny_config  # noqa: E402
from weight_streaming import StreamingConfig, WeightStreamer  # noqa: E402

GiB = 1 << 30
MARGIN = 384 << 20  # kept free on top of the measured activation peak when streaming


def log(*a) -> None:
    print(*a, flush=True)


class Bench:
    """Shapes, device and timing for one run (full size on CUDA, or --smoke on the CPU)."""

    def __init__(self, smoke: bool, steps: int):
        self.smoke = smoke
        self.dev = torch.device("cpu" if smoke else "cuda")
        self.dtype = torch.bfloat16
        self.steps = steps
        if smoke:
            self.config = tiny_config("dev", depth=2, depth_single=4)
            self.n_img, self.n_txt = 64, 16
        else:
            self.config = Flux2Config.from_name("dev")
            self.n_img, self.n_txt = 4096, 512

    def sync(self) -> None:
        if self.dev.type == "cuda":
            torch.cuda.synchronize()

    def inputs(self) -> dict:
        c, g = self.config, torch.Generator(device=self.dev).manual_seed(1)
        side = int(self.n_img**0.5)
        img_ids = torch.zeros(1, self.n_img, 4, device=self.dev)
        img_ids[0, :, 1] = torch.arange(self.n_img, device=self.dev) // side
        img_ids[0, :, 2] = torch.arange(self.n_img, device=self.dev) % side
        txt_ids = torch.zeros(1, self.n_txt, 4, device=self.dev)
        txt_ids[0, :, 3] = torch.arange(self.n_txt, device=self.dev)
        return dict(
            img=torch.randn(1, self.n_img, 128, device=self.dev, dtype=self.dtype, generator=g),
            img_ids=img_ids,
            txt=torch.randn(1, self.n_txt, c.context_dim, device=self.dev, dtype=self.dtype, generator=g),
            txt_ids=txt_ids,
            timesteps=torch.tensor([0.5], device=self.dev),
            guidance=torch.tensor([4.0], device=self.dev),
        )

    def time(self, fn) -> tuple[float, torch.Tensor]:
        """Median seconds of fn() over `steps` calls after one warm-up, and the last output."""
        with torch.inference_mode():
            out = fn()
            times = []
            for _ in range(self.steps):
                self.sync()
                t0 = time.perf_counter()
                out = fn()
                self.sync()
                times.append(time.perf_counter() - t0)
        return statistics.median(times), out

    def free(self) -> None:
        gc.collect()
        if self.dev.type == "cuda":
            torch.cuda.empty_cache()


def random_model(b: Bench, device: torch.device) -> Flux2Transformer:
    """[dev] with N(0, 0.02) weights made block by block on the compute device, then put on `device`."""
    with torch.device("meta"):
        model = Flux2Transformer(b.config, dtype=b.dtype).eval()
    g = torch.Generator(device=b.dev).manual_seed(0)
    pieces = []
    for _, child in model.named_children():
        pieces += list(child) if isinstance(child, nn.ModuleList) else [child]
    with torch.no_grad():
        for piece in pieces:
            piece.to_empty(device=b.dev)
            for p in piece.parameters():
                p.normal_(0.0, 0.02, generator=g) if p.dim() >= 2 else p.fill_(1.0)
            piece.to(device)
    b.free()
    return model


def random_lora(b: Bench, rank: int) -> Flux2LoRA:
    """Rank-`rank` factors on every double/single block linear, bf16 on the host (as loaded)."""
    g = torch.Generator().manual_seed(2)
    shapes = {
        n: m for n, m in Flux2Transformer(b.config, device="meta").named_modules() if isinstance(m, nn.Linear)
    }
    layers = {}
    for name in lora_targets(b.config, "blocks"):
        lin = shapes[name]
        down = (torch.randn(rank, lin.in_features, generator=g) * lin.in_features**-0.5).to(b.dtype)
        up = (torch.randn(lin.out_features, rank, generator=g) * 0.01).to(b.dtype)
        layers[name] = (LowRank(down, up, 1.0, Slot()),)
    return Flux2LoRA(f"random-rank-{rank}", "benchmark", layers, b.config.hidden_size)


def rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    return ((a.float() - ref.float()).abs().max() / ref.float().abs().max()).item()


# --------------------------------------------------------------------------- parts
def part_resident(b: Bench, lora: Flux2LoRA, x: dict, out: dict) -> None:
    model = random_model(b, b.dev)
    base_s, base = b.time(lambda: model(**x))
    if b.dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        weights = torch.cuda.memory_allocated()
    apply_loras(model, [(lora, 1.0)])
    fly_s, fly = b.time(lambda: model(**x))
    if b.dev.type == "cuda":
        out["lora_device_gib"] = round((torch.cuda.max_memory_allocated() - weights) / GiB, 3)
    t0 = time.perf_counter()
    apply_loras(model, [(lora, 1.0)], merge=True)
    b.sync()
    merge_s = time.perf_counter() - t0
    merged_s, merged = b.time(lambda: model(**x))
    t0 = time.perf_counter()
    apply_loras(model, [])
    b.sync()
    unmerge_s = time.perf_counter() - t0
    _, back = b.time(lambda: model(**x))
    out.update(
        resident_base_s=round(base_s, 4),
        resident_lora_s=round(fly_s, 4),
        resident_lora_ratio=round(fly_s / base_s, 4),
        merged_s=round(merged_s, 4),
        merged_ratio=round(merged_s / base_s, 4),
        merge_seconds=round(merge_s, 2),
        unmerge_seconds=round(unmerge_s, 2),
        unmerge_bit_exact=bool(torch.equal(back, base)),
        merged_vs_fly_rel=round(rel(merged, fly), 5),
        lora_effect_rel=round(rel(fly, base), 4),
    )
    log(
        f"[resident] base {base_s * 1e3:.1f} ms, LoRA on the fly {fly_s * 1e3:.1f} ms ({fly_s / base_s:.4f}x)"
    )
    log(
        f"[resident] merged {merged_s * 1e3:.1f} ms ({merged_s / base_s:.4f}x); merge {merge_s:.2f} s, un-merge {unmerge_s:.2f} s"
    )
    log(
        f"[resident] un-merge bit exact: {out['unmerge_bit_exact']}; merged vs on the fly rel {out['merged_vs_fly_rel']:.2e}"
    )
    model = base = fly = merged = back = None  # noqa: F841  (frees the weights before the next part)
    b.free()


def part_streamed(b: Bench, lora: Flux2LoRA, x: dict, out: dict, budget_gib: float) -> None:
    model = random_model(b, torch.device("cpu"))
    if b.smoke:
        weights_budget = 0  # every block paged through the ring
    else:
        # Activation peak of one resident-size step is unknown here: take the [dev] figure the
        # transformer benchmark measures (about 1 GiB at 1024^2) with a margin.
        # The LoRA factors sit on the GPU too (as the node's holder budgets them).
        weights_budget = int(budget_gib * GiB) - int(1.0 * GiB) - MARGIN - lora.nbytes()
    flops = block_flops(
        b.config, tokens_for(16 * int(b.n_img**0.5), 16 * int(b.n_img**0.5), b.n_txt)
    ).per_block
    cfg = StreamingConfig(vram_budget=weights_budget, block_flops=flops)
    with torch.no_grad(), WeightStreamer(model, cfg, b.dev) as ws:
        plan = ws.plan
        base_s, base = b.time(lambda: model(**x))
        apply_loras(model, [(lora, 1.0)])
        fly_s, fly = b.time(lambda: model(**x))
        same_plan = ws.plan is plan
        apply_loras(model, [(lora, 0.5)])  # a strength change while attached
        half_s, _ = b.time(lambda: model(**x))
        apply_loras(model, [])
        _, back = b.time(lambda: model(**x))
    out.update(
        streamed_budget_gib=budget_gib if not b.smoke else 0,
        streamed_blocks=len(plan.streamed_indices),
        resident_blocks=len(plan.resident_indices),
        streamed_base_s=round(base_s, 4),
        streamed_lora_s=round(fly_s, 4),
        streamed_lora_ratio=round(fly_s / base_s, 4),
        streamed_lora_half_strength_s=round(half_s, 4),
        streamed_plan_unchanged=same_plan,
        streamed_removal_bit_exact=bool(torch.equal(back, base)),
    )
    log(
        f"[streamed {out['streamed_budget_gib']} GiB: {len(plan.resident_indices)} resident / "
        f"{len(plan.streamed_indices)} streamed blocks] base {base_s * 1e3:.1f} ms, LoRA {fly_s * 1e3:.1f} ms "
        f"({fly_s / base_s:.4f}x), strength 0.5 {half_s * 1e3:.1f} ms; plan unchanged {same_plan}"
    )
    model = base = fly = back = None  # noqa: F841
    b.free()


def part_anchor(b: Bench, rank: int, x: dict, out: dict) -> None:
    """diffusers + peft, same shapes, rank and block layers, resident."""
    try:
        from diffusers import Flux2Transformer2DModel
        from peft import LoraConfig
    except ImportError as e:
        log(f"[anchor] diffusers/peft not importable ({e}); skipped")
        out["anchor"] = f"skipped: {e}"
        return
    c = b.config
    old = torch.get_default_dtype()
    torch.set_default_dtype(b.dtype)
    try:
        with torch.device(b.dev):
            ref = Flux2Transformer2DModel(
                num_layers=c.depth,
                num_single_layers=c.depth_single,
                num_attention_heads=c.num_heads,
                joint_attention_dim=c.context_dim,
                guidance_embeds=c.guidance_embed,
            ).eval()
    finally:
        torch.set_default_dtype(old)
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_(0.0, 0.02) if p.dim() >= 2 else p.fill_(1.0)

    def run():
        return ref(
            hidden_states=x["img"],
            encoder_hidden_states=x["txt"],
            timestep=x["timesteps"],
            img_ids=x["img_ids"][0],
            txt_ids=x["txt_ids"][0],
            guidance=x["guidance"],
            return_dict=False,
        )[0]

    base_s, _ = b.time(run)
    # Every block linear, as a regex (peft full-matches a string): the double blocks' ``attn.to_out`` is
    # a ModuleList (linear + dropout), so plain suffix names would catch it.
    targets = (
        r"transformer_blocks\.\d+\.(attn\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|to_add_out)"
        r"|ff(_context)?\.linear_(in|out))|single_transformer_blocks\.\d+\.attn\.(to_qkv_mlp_proj|to_out)"
    )
    ref.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=targets, init_lora_weights=False))
    lora_s, _ = b.time(run)
    out.update(
        anchor_diffusers_base_s=round(base_s, 4),
        anchor_diffusers_lora_s=round(lora_s, 4),
        anchor_diffusers_lora_ratio=round(lora_s / base_s, 4),
    )
    log(
        f"[anchor diffusers+peft] base {base_s * 1e3:.1f} ms, LoRA {lora_s * 1e3:.1f} ms ({lora_s / base_s:.4f}x)"
    )
    ref = None  # noqa: F841
    b.free()


# --------------------------------------------------------------------------- entry points
def run(argv: list[str] | None = None) -> dict:
    """Runs the parts named in argv (see --help) and returns every figure (printed as it is measured)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU (checks the script)")
    ap.add_argument("--parts", default="resident,streamed,anchor")
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--budget-gib", type=float, default=12.0, help="VRAM budget of the streamed part")
    ap.add_argument("--steps", type=int, default=5)
    args = ap.parse_args(argv)
    if not args.smoke and not torch.cuda.is_available():
        log("no CUDA device: nothing to benchmark (use --smoke on the CPU)")
        return {"skipped": "no CUDA device"}
    b = Bench(args.smoke, args.steps)
    lora = random_lora(b, args.rank)
    out: dict = {
        "device": "cpu (smoke)" if b.smoke else torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "rank": args.rank,
        "lora_layers": len(lora.layers),
        "lora_gib": round(lora.nbytes() / GiB, 3),
        "image_tokens": b.n_img,
        "text_tokens": b.n_txt,
    }
    log(f"[lora] rank {args.rank} on {len(lora.layers)} block linears, {lora.nbytes() / 2**20:.1f} MiB")
    x = b.inputs()
    parts = args.parts.split(",")
    if "resident" in parts:
        part_resident(b, lora, x, out)
    if "streamed" in parts:
        part_streamed(b, lora, x, out, args.budget_gib)
    if "anchor" in parts:
        part_anchor(b, args.rank, x, out)
    if "resident_lora_ratio" in out and "anchor_diffusers_lora_ratio" in out:
        log(
            f"[lora] added step time: ours {100 * (out['resident_lora_ratio'] - 1):.2f}%, "
            f"diffusers+peft {100 * (out['anchor_diffusers_lora_ratio'] - 1):.2f}%"
        )
    return out


def main() -> None:
    print(json.dumps(run()))


if __name__ == "__main__":
    main()
