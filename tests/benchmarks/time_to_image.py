"""Time to image through a real ComfyUI server: our shipped workflows against ComfyUI's own FLUX.2
workflow on the same full-size random files, on emulated 24 / 12 / 8 GiB cards (GPU; JSON line last).

Per model set ([klein] 4B + Qwen3 4B, [klein] 9B + Qwen3 8B, [dev] FP8 fp8mixed + Mistral Small FP8,
[dev] GGUF Q4_K_M + Mistral Small FP8), one set on disk at a time (written tensor by tensor by `tti_models`, deleted before the next set):
for each budget and each system a fresh server (`tti_runtime.BenchServer`, default flags) runs
  cold    page cache dropped, server just started, first prompt;
  warm    the same server, a new prompt and seed;
  repeat  the same prompt again with a new seed (the text encoding is cached by ComfyUI).
Stages come from the server's websocket events: load (loader nodes), text encode (the encode node,
placing the encoder included), sampler setup (how much longer the first step took than a steady one:
placing / pinning the transformer), each step, decode, total (POST to execution_success). Memory comes
from the probe pack sampling inside the server: peak VRAM (per stage), peak pinned (ours: the
weight_streaming ledger; ComfyUI: its pinned counter), peak RSS and machine RAM in use.

ComfyUI's workflow follows its FLUX.2 templates (comfyui-workflow-templates image_flux2_text_to_image,
image_flux2_klein_text_to_image): UNETLoader (ComfyUI-GGUF's UnetLoaderGGUF for a .gguf, as its users
run it), CLIPLoader(flux2), CLIPTextEncode, FluxGuidance + BasicGuider ([dev]) or CFGGuider 1 with a
zeroed negative ([klein]), RandomNoise, KSamplerSelect(euler), Flux2Scheduler, EmptyFlux2LatentImage,
SamplerCustomAdvanced, VAEDecode; steps, size, seed and prompt equal to ours.
Our nodes now also report attach and encoder progress on their nodes (progress events whose maximum is
MiB or layers): the steps are the sampler's progress events after the last of those.

Examples (device: `source tests/benchmarks/tti_device_setup.sh` first; one command stays within 10 min):
  python3 tests/benchmarks/time_to_image.py --set klein4b --budgets 24,12,8 --keep-models
  python3 tests/benchmarks/time_to_image.py --set dev --budgets 12 --systems ours,comfy --keep-models
  python3 tests/benchmarks/time_to_image.py --set dev --budgets 12 --low-ram 32 --systems ours
  python3 tests/benchmarks/time_to_image.py --set dev --budgets 12 --size 2048 --systems ours
  python3 tests/benchmarks/time_to_image.py --set dev-gguf --budgets 12,8 --keep-models
  python3 tests/benchmarks/time_to_image.py --report          # every result so far, ratios and goals
  python3 tests/benchmarks/time_to_image.py --smoke           # CPU: tiny models, the same machinery
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path[:0] = [str(ROOT), str(HERE)]

import tti_models  # noqa: E402
import tti_runtime as rt  # noqa: E402
from comfy_server import history_error, make_base_directory  # noqa: E402
from tti_runtime import GiB, say  # noqa: E402

OUT = ROOT / ".device_out" / "time_to_image"
PROMPTS = (
    "A lighthouse on a cliff in a storm, oil painting",
    "A red fox sitting in fresh snow at sunrise, detailed fur, 85mm photo",
)
LOADERS = {
    "Flux2LocalModelLoader",
    "Flux2LocalLoRALoader",
    "Flux2LocalTextEncoderLoader",
    "Flux2LocalVAELoader",
    "UNETLoader",
    "UnetLoaderGGUF",
    "CLIPLoader",
    "VAELoader",
}
ENCODERS = {"Flux2LocalEncodePrompt", "CLIPTextEncode", "Flux2LocalTestToNativeConditioning"}
SAMPLERS = {"Flux2LocalSampler", "SamplerCustomAdvanced"}
DECODERS = {"Flux2LocalVAEDecode", "VAEDecode"}


# ------------------------------------------------------------------------------------ workflows
def ours_prompt(s: tti_models.ModelSet, text: str, seed: int, size: int | None, steps: int | None) -> dict:
    """The shipped API workflow with this set's files, the prompt text and seed."""
    g = json.loads((ROOT / "workflows" / "api" / f"{s.workflow}.api.json").read_text())
    for node in g.values():
        i, kind = node["inputs"], node["class_type"]
        if kind == "Flux2LocalModelLoader":
            i["model_name"] = s.transformer
        elif kind == "Flux2LocalTextEncoderLoader":
            i["text_encoder_name"] = s.text_encoder
        elif kind == "Flux2LocalVAELoader":
            i["vae_name"] = tti_models.VAE_FILE
        elif kind == "Flux2LocalEncodePrompt":
            i["prompt"] = text
        elif kind == "Flux2LocalSampler":
            i["seed"] = seed
            if size:
                i["width"] = i["height"] = size
            if steps:
                i["steps"] = steps
    return g


def sampler_settings(g: dict) -> dict:
    return next(n["inputs"] for n in g.values() if n["class_type"] == "Flux2LocalSampler")


def native_prompt(s: tti_models.ModelSet, text: str, seed: int, like: dict, smoke: bool) -> dict:
    """ComfyUI's FLUX.2 template graph on the same files, with our workflow's steps, size and seed."""
    p = sampler_settings(like)
    w, h, steps, guidance = p["width"], p["height"], p["steps"], p["guidance"]
    g = {
        "unet": {
            "class_type": "UNETLoader",
            "inputs": {"unet_name": s.transformer, "weight_dtype": "default"},
        }
        if not s.transformer.endswith(".gguf")
        else {"class_type": "UnetLoaderGGUF", "inputs": {"unet_name": s.transformer}},
        "vae": {"class_type": "VAELoader", "inputs": {"vae_name": tti_models.VAE_FILE}},
        "noise": {"class_type": "RandomNoise", "inputs": {"noise_seed": seed}},
        "sampler": {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "euler"}},
        "sigmas": {"class_type": "Flux2Scheduler", "inputs": {"steps": steps, "width": w, "height": h}},
        "latent": {
            "class_type": "EmptyFlux2LatentImage",
            "inputs": {"width": w, "height": h, "batch_size": 1},
        },
        "sca": {
            "class_type": "SamplerCustomAdvanced",
            "inputs": {
                "noise": ["noise", 0],
                "guider": ["guider", 0],
                "sampler": ["sampler", 0],
                "sigmas": ["sigmas", 0],
                "latent_image": ["latent", 0],
            },
        },  # fmt: skip
        "decode": {"class_type": "VAEDecode", "inputs": {"samples": ["sca", 0], "vae": ["vae", 0]}},
        "save": {"class_type": "SaveImage", "inputs": {"images": ["decode", 0], "filename_prefix": "native"}},
    }
    if smoke:  # ComfyUI's CLIPLoader only knows the real sizes: the test bridge hands over our encoding
        g["te"] = {"class_type": "Flux2LocalTextEncoderLoader", "inputs": {"text_encoder_name": s.text_encoder, "tokenizer": "auto", "dtype": "bf16"}}  # fmt: skip
        g["enc"] = {"class_type": "Flux2LocalEncodePrompt", "inputs": {"text_encoder": ["te", 0], "prompt": text, "negative_prompt": "", "upsample_prompt": False, "upsample_seed": 0, "upsample_max_tokens": 512}}  # fmt: skip
        g["cond"] = {"class_type": "Flux2LocalTestToNativeConditioning", "inputs": {"conditioning": ["enc", 0], "guidance": guidance, "negative": False}}  # fmt: skip
    else:
        g["clip"] = {"class_type": "CLIPLoader", "inputs": {"clip_name": s.text_encoder, "type": "flux2", "device": "default"}}  # fmt: skip
        g["cond"] = {"class_type": "CLIPTextEncode", "inputs": {"clip": ["clip", 0], "text": text}}
    if s.variant == "dev":
        g["fg"] = {
            "class_type": "FluxGuidance",
            "inputs": {"conditioning": ["cond", 0], "guidance": guidance},
        }
        g["guider"] = {
            "class_type": "BasicGuider",
            "inputs": {"model": ["unet", 0], "conditioning": ["fg", 0]},
        }
    else:
        g["neg"] = {"class_type": "ConditioningZeroOut", "inputs": {"conditioning": ["cond", 0]}}
        g["guider"] = {"class_type": "CFGGuider", "inputs": {"model": ["unet", 0], "positive": ["cond", 0], "negative": ["neg", 0], "cfg": 1.0}}  # fmt: skip
    return g


# --------------------------------------------------------------------------------------- stages
def stages(
    prompt: dict, events: list, t_post: float, t_end: float, series: dict, base: dict, attaches: list
) -> dict:
    """Per-stage times and memory of one finished prompt (see the module docstring)."""
    kinds = {k: v["class_type"] for k, v in prompt.items()}
    cached = set()
    starts = []
    progress = []
    for t, m in events:
        kind, data = m.get("type"), m.get("data", {})
        if kind == "execution_cached":
            cached |= set(data.get("nodes", []))
        elif kind == "executing" and data.get("node") is not None:
            starts.append((t, data["node"]))
        elif kind == "progress" and kinds.get(str(data.get("node"))) in SAMPLERS:
            progress.append((t, int(data["value"]), int(data["max"])))
    # Steps: the sampler's progress after its last event of another maximum (attach progress in MiB).
    if progress:
        n_steps = progress[-1][2]
        first = max((i + 1 for i, p in enumerate(progress) if p[2] != n_steps), default=0)
        progress = progress[first:]
    windows: dict[str, list[tuple[float, float]]] = {}
    for i, (t, node) in enumerate(starts):
        windows.setdefault(node, []).append((t, starts[i + 1][0] if i + 1 < len(starts) else t_end))

    def total_of(classes):
        return sum(b - a for n, ws in windows.items() if kinds.get(n) in classes for a, b in ws)

    def window_of(classes):
        ws = [w for n, wl in windows.items() if kinds.get(n) in classes for w in wl]
        return (min(a for a, _ in ws), max(b for _, b in ws)) if ws else None

    sampler = window_of(SAMPLERS)
    steps, seen = [], set()
    prev = sampler[0] if sampler else t_post
    for t, value, _max in progress:
        if value < 1 or value in seen:
            continue
        seen.add(value)
        steps.append(t - prev)
        prev = t
    steady = statistics.median(steps[1:]) if len(steps) > 1 else (steps[0] if steps else 0.0)
    out = {
        "total_s": t_end - t_post,
        "load_s": total_of(LOADERS),
        "encode_s": total_of(ENCODERS),
        "sampler_s": total_of(SAMPLERS),
        "setup_s": max(0.0, steps[0] - steady) if steps else 0.0,
        "steps_s": steps,
        "step_s": steady,
        "decode_s": total_of(DECODERS),
        "cached_nodes": sorted(cached),
    }
    # Memory: peaks over the whole prompt and per stage, above what was in use before the server started.
    t = series.get("t", [])

    def peak(key, win=None, minus=0):
        vals = [
            v
            for ti, v in zip(t, series[key])
            if (win is None and t_post <= ti <= t_end) or (win and win[0] <= ti <= win[1])
        ]
        return (max(vals) - minus) / GiB if vals else 0.0

    out["vram_peak_gib"] = peak("vram_used", minus=base["vram"])
    out["vram_by_stage_gib"] = {
        name: peak("vram_used", w, base["vram"])
        for name, classes in (
            ("load", LOADERS),
            ("encode", ENCODERS),
            ("sample", SAMPLERS),
            ("decode", DECODERS),
        )
        if (w := window_of(classes))
    }
    out["pinned_ours_peak_gib"] = peak("pinned_ours")
    out["pinned_comfy_peak_gib"] = peak("pinned_comfy")
    out["rss_peak_gib"] = peak("rss")
    out["ram_used_peak_gib"] = peak("sys_used", minus=base["ram"])
    enc = window_of(ENCODERS)
    out["attaches"] = [
        dict(a, stage="encode" if enc and enc[0] <= a["start"] <= enc[1] else "sample")
        for a in attaches
        if t_post <= a["start"] <= t_end
    ]
    return out


# ----------------------------------------------------------------------------------------- runs
def run_system(
    args, s: tti_models.ModelSet, models: Path, system: str, budget: int | None, size, limit
) -> list[dict]:
    """Cold, warm and repeat runs of one system on a fresh server; returns one record per run."""
    files = list(tti_models.set_files(models, s).values())
    base_dir = Path(tempfile.mkdtemp(prefix="tti-base-", dir=OUT))
    make_base_directory(base_dir)
    shutil.rmtree(base_dir / "models")
    (base_dir / "models").symlink_to(models, target_is_directory=True)
    rt.link_packs(base_dir, args.smoke, gguf=s.transformer.endswith(".gguf"))
    if system != "ours" and not args.smoke:  # ComfyUI on its own (smoke runs need our encoder for it)
        (base_dir / "custom_nodes" / "flux2local-under-test").unlink()
    extra = rt.frontend_args() + (["--fast", "dynamic_vram"] if system == "comfy-dynamic" else [])
    ram = rt.RamLimit(limit, allow_ballast=not args.smoke)
    cache = rt.drop_page_cache(files, everything=not args.smoke)
    ballast = rt.VramBallast(budget)
    base = {"vram": ballast.base_used, "ram": rt.system_ram_used()}
    server = rt.BenchServer(base_dir, gpu=not args.smoke, prefix=ram.prefix, extra_args=extra)
    records = []
    label = f"{s.name} {system} {'cpu' if budget is None else f'{budget / GiB:.0f} GiB'}"
    try:
        t0 = time.monotonic()
        server.start(timeout=600)
        say(f"{label}: server up in {time.monotonic() - t0:.1f} s (RAM limit: {ram.method}; cache: {cache})")
        events = rt.Events(server)
        if limit is not None:
            from weight_streaming import default_pinned_limit

            # The pin caps a machine with `limit` bytes of RAM gets: ours by default, ComfyUI's v0.12 rule (95%).
            server.probe(
                "config",
                {"pinned_limit": default_pinned_limit(limit), "comfy_pinned_limit": int(limit * 0.95)},
            )
        else:
            server.probe("config", {})
        link = server.probe("link") if not args.smoke else {}
        seed = 1
        for run, text in (("cold", PROMPTS[0]), ("warm", PROMPTS[1]), ("repeat", PROMPTS[1])):
            seed += 1
            g = ours_prompt(s, text, seed, size, args.steps)
            if system != "ours":
                g = native_prompt(s, text, seed, g, args.smoke)
            t_post = time.monotonic()
            status, body = server.queue_prompt(g)
            if status != 200:
                raise RuntimeError(f"/prompt answered {status}: {json.dumps(body)[:2000]}")
            t_end, how = events.wait_done(body["prompt_id"], args.timeout, server.alive)
            entry = server.wait_history(body["prompt_id"], timeout=60)
            err = history_error(entry)
            rec = {"set": s.name, "system": system, "budget_gib": None if budget is None else budget / GiB,
                   "run": run, "size": sampler_settings(ours_prompt(s, text, seed, size, args.steps))["width"],
                   "smoke": args.smoke, "ram_limit_gib": None if limit is None else limit / GiB,
                   "ram_limit_method": ram.method, "cache_drop": cache if run == "cold" else None,
                   "link": link, "ok": how == "execution_success" and err is None,
                   "error": None if err is None else str(err.get("exception_message", ""))[:500]}  # fmt: skip
            series = server.probe(f"series?since={t_post - 1}")
            rec.update(
                stages(g, events.of(body["prompt_id"]), t_post, t_end, series, base, server.probe("attaches"))
            )
            records.append(rec)
            say(
                f"{label} {run}: {'ok' if rec['ok'] else 'FAILED ' + str(rec['error'])} total {rec['total_s']:.2f} s "
                f"(load {rec['load_s']:.2f}, encode {rec['encode_s']:.2f}, setup {rec['setup_s']:.2f}, "
                f"{len(rec['steps_s'])} steps x {rec['step_s']:.3f}, decode {rec['decode_s']:.2f}); "
                f"VRAM {rec['vram_peak_gib']:.2f} GiB, pinned {max(rec['pinned_ours_peak_gib'], rec['pinned_comfy_peak_gib']):.2f} GiB, "
                f"RSS {rec['rss_peak_gib']:.1f} GiB"
            )
            if not rec["ok"]:
                say(server.log_tail(40))
                break
        events.close()
    finally:
        server.stop()
        ballast.release()
        ram.release()
        if not args.keep_servers:
            shutil.rmtree(base_dir, ignore_errors=True)
    return records


# --------------------------------------------------------------------------------------- report
def _by(records, **kw):
    return [r for r in records if all(r.get(k) == v for k, v in kw.items())]


def report(records: list[dict], disk_rate: dict[str, float]) -> dict:
    """Print the tables, ratios and goals; returns the summary for the JSON line."""
    summary = {"runs": len(records), "goals": {}}
    keys = sorted({(r["set"], r["budget_gib"], r["size"], r["ram_limit_gib"]) for r in records}, key=str)
    print(
        "\nset      | budget | size | RAM   | run    | system        | total s | load | encode | setup | step s  | decode | VRAM GiB | pinned | RSS"
    )
    for st, budget, size, ram in keys:
        for run in ("cold", "warm", "repeat"):
            for r in _by(records, set=st, budget_gib=budget, size=size, ram_limit_gib=ram, run=run):
                pinned = max(r["pinned_ours_peak_gib"], r["pinned_comfy_peak_gib"])
                print(
                    f"{st:8} | {budget if budget is not None else 'cpu':>6} | {size:4} | {ram if ram else '-':>5} | {run:6} | "
                    f"{r['system']:13} | {r['total_s']:7.2f} | {r['load_s']:4.1f} | {r['encode_s']:6.2f} | {r['setup_s']:5.2f} | "
                    f"{r['step_s']:7.3f} | {r['decode_s']:6.2f} | {r['vram_peak_gib']:8.2f} | {pinned:6.2f} | {r['rss_peak_gib']:.1f}"
                    + ("" if r["ok"] else f"  FAILED: {r['error']}")
                )
    # Goals of the issue, where both sides of a ratio were measured.
    for st, budget, size, ram in keys:
        tag = (
            f"{st}@{'cpu' if budget is None else f'{budget:g}GiB'}"
            + (f"/{size}px" if size != 1024 else "")
            + (f"/RAM{ram}" if ram else "")
        )
        ours = {
            r["run"]: r
            for r in _by(records, set=st, budget_gib=budget, size=size, ram_limit_gib=ram, system="ours")
        }
        comfy = {
            r["run"]: r
            for r in _by(records, set=st, budget_gib=budget, size=size, ram_limit_gib=ram, system="comfy")
        }
        g = {}
        if "warm" in ours and "warm" in comfy:
            g["warm_vs_comfy"] = ours["warm"]["total_s"] / comfy["warm"]["total_s"]
            g["warm_goal_0.8_met"] = g["warm_vs_comfy"] <= 0.8
        if "cold" in comfy and "cold" in ours:
            g["cold_vs_comfy"] = ours["cold"]["total_s"] / comfy["cold"]["total_s"]
        if "cold" in ours and "warm" in ours and disk_rate.get(st):
            bound = disk_rate["bytes_" + st] / disk_rate[st] + ours["warm"]["total_s"]
            g["cold_vs_bound"] = ours["cold"]["total_s"] / bound
            g["cold_goal_1.1_met"] = g["cold_vs_bound"] <= 1.1
        if budget and ours:
            over = {
                f"{r['run']}:{k}": v
                for r in ours.values()
                for k, v in r["vram_by_stage_gib"].items()
                if v > budget
            }
            g["stages_over_budget"] = over
        te = [
            a for r in ours.values() for a in r["attaches"] if a["stage"] == "encode" and r["run"] == "warm"
        ]
        if st == "dev" and budget == 12 and te and ours.get("warm", {}).get("link"):
            r = ours["warm"]
            link = r["link"]
            forward = r["encode_s"] - sum(a["end"] - a["start"] for a in te)
            shape = tti_models.decoder_shape("mistral3", False)
            per_layer = (
                2
                * shape.hidden_size
                * shape.head_dim
                * (shape.num_attention_heads + shape.num_key_value_heads)
                + 3 * shape.hidden_size * shape.intermediate_size
            )
            compute = (
                2 * per_layer * 30 * 512 / max(link["bf16_matmul_flops"], 1.0)
            )  # layers 1-30 of 40, 512 tokens
            xfer = te[-1]["streamed_bytes"] / max(link["h2d_bytes_per_s"], 1.0)
            g["te_encode_s"], g["te_bound_s"] = forward, max(compute, xfer)
            g["te_vs_bound"] = forward / g["te_bound_s"]
            g["te_goal_1.15_met"] = g["te_vs_bound"] <= 1.15
        if g:
            summary["goals"][tag] = g
            print(
                f"goals {tag}: "
                + ", ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in g.items())
            )
    summary["ok"] = all(r["ok"] for r in records)
    summary["records"] = [{k: r[k] for k in ("set", "system", "budget_gib", "run", "size", "ram_limit_gib", "ok", "total_s",
                                            "load_s", "encode_s", "setup_s", "step_s", "decode_s", "vram_peak_gib",
                                            "pinned_ours_peak_gib", "pinned_comfy_peak_gib", "rss_peak_gib", "ram_used_peak_gib")}
                          for r in records]  # fmt: skip
    return summary


# ----------------------------------------------------------------------------------------- main
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--set", default="klein4b", help="klein4b, klein9b, dev or dev-gguf (comma list)")
    ap.add_argument("--budgets", default="24,12,8", help="emulated card sizes in GiB (comma list)")
    ap.add_argument("--systems", default="ours,comfy", help="ours, comfy (default flags), comfy-dynamic")
    ap.add_argument("--size", type=int, default=None, help="image side in pixels (default: the workflow's)")
    ap.add_argument("--steps", type=int, default=None, help="override the workflow's steps")
    ap.add_argument(
        "--low-ram", type=float, default=None, help="run with this much RAM (GiB): cgroup or ballast"
    )
    ap.add_argument("--keep-models", action="store_true", help="leave the set on disk for the next command")
    ap.add_argument("--keep-servers", action="store_true", help="keep each server's folder (logs)")
    ap.add_argument("--timeout", type=float, default=1800.0, help="seconds per prompt")
    ap.add_argument("--report", action="store_true", help="print every stored result and exit")
    ap.add_argument("--smoke", action="store_true", help="CPU: tiny models through the same machinery")
    args = ap.parse_args(argv)
    OUT.mkdir(parents=True, exist_ok=True)
    results = OUT / ("results-smoke.jsonl" if args.smoke else "results.jsonl")
    rates_file = OUT / ("disk-smoke.json" if args.smoke else "disk.json")
    rates = json.loads(rates_file.read_text()) if rates_file.is_file() else {}
    if args.report:
        records = [json.loads(line) for line in results.read_text().splitlines()] if results.is_file() else []
        print(json.dumps(report(records, rates)))
        return 0
    import torch

    if args.smoke:
        args.budgets, args.steps, args.size = "", args.steps or 2, args.size or 128
        args.timeout = min(args.timeout, 600)
    elif not torch.cuda.is_available():
        say("no CUDA device: run with --smoke on a CPU machine")
        return 2
    models = OUT / ("models-smoke" if args.smoke else "models")
    for sub in ("diffusion_models", "text_encoders", "vae"):
        (models / sub).mkdir(parents=True, exist_ok=True)
    # Mistral's tokenizer, which ComfyUI's Mistral files embed: the test assets here, the carried copy there.
    assets = os.environ.get("FLUX2LOCAL_ASSETS")
    tekken = next(iter(sorted(ROOT.glob(".device_out/tekken.json"))), None)
    if tekken is None and assets:
        tekken = Path(assets) / "mistral3-tekken" / "tekken.json"
    budgets = [int(float(b) * GiB) for b in args.budgets.split(",") if b] or [None]
    limit = int(args.low_ram * GiB) if args.low_ram else None
    records = []
    for name in args.set.split(","):
        if name not in tti_models.SETS:
            say(f"unknown set {name}: choose from {', '.join(tti_models.SETS)}")
            continue
        s = tti_models.SETS[name]
        tti_models.delete_sets(models, keep=s)  # one set on disk at a time
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        free = shutil.disk_usage(models).free
        say(f"writing set {name} ({free / GiB:.0f} GiB free on disk)")
        wrote = tti_models.write_set(models, s, smoke=args.smoke, device=device, tekken=tekken, log=say)
        torch.cuda.empty_cache() if torch.cuda.is_available() else None
        files = tti_models.set_files(models, s)
        rates["bytes_" + name] = sum(p.stat().st_size for p in files.values())
        if name not in rates or not wrote.get("reused", False):
            rates[name] = rt.disk_read_rate(files["transformer"])
            say(f"disk read rate {rates[name] / 1e9:.2f} GB/s (the cold bound's divisor)")
        rates_file.write_text(json.dumps(rates))
        for budget in budgets:
            for system in args.systems.split(","):
                recs = run_system(args, s, models, system, budget, args.size, limit)
                records += recs
                with open(results, "a") as f:
                    for r in recs:
                        f.write(json.dumps(r) + "\n")
        if not args.keep_models:
            tti_models.delete_sets(models)
    summary = report(records, rates)
    print(json.dumps(summary))
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
