"""Printing for the transformer benchmark: one line per measurement, the summary table, the ratios."""

from __future__ import annotations

from bench_util import GOALS


def log(*a) -> None:
    print(*a, flush=True)


def print_row(case: str, key: str, r: dict) -> None:
    if "skipped" in r:
        log(f"[{case}] {key}: skipped ({r['skipped']})")
        return
    extra = f", first call +{r['warmup_s']:.2f} s" if "warmup_s" in r else ""
    if r.get("compile_s"):
        extra += f" (compile {r['compile_s']:.1f} s)"
    if r.get("graphs"):
        extra += f", {r['graphs']} CUDA graph(s)"
    if "activation_gib" in r:
        extra += f", activations {r['activation_gib']:.2f} GiB"
    if "error_vs_sdpa" in r:
        extra += f", error vs SDPA {r['error_vs_sdpa']}"
    log(f"[{case}] {key}: {r['seconds'] * 1e3:.2f} ms{extra}")


def _ms(row: dict, key: str) -> str:
    r = row.get(key, {})
    return f"{r['seconds'] * 1e3:.1f}" if "seconds" in r else "-"


def summarize(results: dict) -> None:
    cols = [
        ("ours eager", "ours_eager"),
        ("ours fast", "ours_fast"),
        ("ours kitchen", "ours_kitchen"),
        ("ours weight-only fast", "ours_weight_only_fast"),
        ("ComfyUI + ck", "comfyui"),
        ("ComfyUI + ck compiled", "comfyui_compile"),
        ("ComfyUI no ck", "comfyui_nokitchen"),
        ("ComfyUI FP8 + ck", "comfyui_fp8"),
        ("ComfyUI FP8 no input_scale", "comfyui_fp8_noscale"),
        ("diffusers", "diffusers"),
    ]
    log("")
    log(
        "| case (ms) | "
        + " | ".join(c for c, _ in cols)
        + " | goal | fast compile s | act. GiB eager / fast |"
    )
    log("|---" * (len(cols) + 4) + "|")
    for name, row in results["cases"].items():
        fast = row.get("ours_fast", {})
        act = "/".join(
            f"{row[k]['activation_gib']:.2f}" if "activation_gib" in row.get(k, {}) else "-"
            for k in ("ours_eager", "ours_fast")
        )
        goal = GOALS.get(name)
        goal_s = f"{goal * 1e3:.0f}" if goal else "-"
        log(
            f"| {name} | "
            + " | ".join(_ms(row, k) for _, k in cols)
            + f" | {goal_s} | {fast.get('compile_s', '-')} | {act} |"
        )
    log("")
    log("Ratios (anchor / ours fast; > 1 means ours is faster):")
    for name, row in results["cases"].items():
        ours = row.get("ours_fast", {}).get("seconds")
        if not ours:
            continue
        parts = []
        for label, key in cols:
            s = row.get(key, {}).get("seconds")
            if s and key != "ours_fast":
                parts.append(f"{label} {s / ours:.3f}")
                row[f"ratio_{key}_over_fast"] = round(s / ours, 4)
        log(f"  [{name}] " + ", ".join(parts))
    # Weight-only FP8 against the bf16 fast step of the same model (the RTX 3090 goal: <= 1.10x).
    for name, row in results["cases"].items():
        bf16 = results["cases"].get(name.replace("-fp8", ""), {}).get("ours_fast", {}).get("seconds")
        wo = row.get("ours_weight_only_fast", {}).get("seconds")
        if name.endswith("-fp8") and bf16 and wo:
            row["weight_only_over_bf16"] = round(wo / bf16, 4)
            log(f"  [{name}] weight-only FP8 fast / bf16 fast = {wo / bf16:.3f} (goal <= 1.10)")
