"""ComfyUI anchors of the transformer benchmark, run in a child process of `transformer.py`.

ComfyUI binds comfy-kitchen at import time (its RoPE kernel in ``comfy.ldm.flux.math`` and its FP8
ops in ``comfy.quant_ops``), so "with comfy-kitchen" and "without" need separate processes: the parent
runs this file once with comfy-kitchen on PYTHONPATH and once with ``--no-kitchen``, which makes the
import fail as on an install without it. Each run prints one JSON line.

Anchors (``--what``):
- ``bf16``: ComfyUI's FLUX.2 model (``comfy.ldm.flux.model.Flux``), bf16 weights, its default ops.
- ``compile``: the same model through ``torch.compile`` as ComfyUI's TorchCompileModel node applies it
  (the whole diffusion model, inductor, its guard filter on ``transformer_options``).
- ``fp8``: ComfyUI's own FP8 path: a state dict with ``comfy_quant`` markers, per-tensor
  ``weight_scale`` and a static ``input_scale`` on every block linear, loaded through its
  mixed-precision ops (``comfy.ops.mixed_precision_ops``), as ComfyUI loads an FP8 checkpoint.
- ``fp8-noscale``: the same without ``input_scale`` (ComfyUI then quantizes activations with scale 1).

    python tests/benchmarks/comfy_transformer.py --case dev --what bf16,compile [--no-kitchen] [--smoke]
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from bench_util import (
    CASES,
    DTYPE,
    INPUT_SCALE,
    allocated_gib,
    bfl_random_state_dict,
    device,
    free,
    inputs,
    random_init_,
    time_it,
)


def _import_comfy(comfy_path: str, cpu: bool):
    if comfy_path not in sys.path:
        sys.path.insert(0, comfy_path)
    import comfy.cli_args

    if cpu:
        comfy.cli_args.args.cpu = True  # import without a GPU (--smoke)
    import comfy.ldm.flux.model as flux_model
    import comfy.ops
    from comfy_streaming import unet_config  # ComfyUI's config for BFL FLUX.2 keys

    return flux_model, comfy.ops, unet_config


def _fp8_state_dict(cfg, dev, static_scale: bool) -> dict:
    """BFL random weights with every block linear quantized the way ComfyUI's FP8 files store it."""
    import torch

    from flux2_core.config import is_block_linear

    sd = bfl_random_state_dict(cfg, dev)
    marker = torch.tensor(list(json.dumps({"format": "float8_e4m3fn"}).encode("utf-8")), dtype=torch.uint8)
    for k in [k for k in sd if is_block_linear(k)]:
        w = sd.pop(k).float()
        scale = (w.abs().amax() / 448.0).clamp(min=1e-12)
        prefix = k[: -len("weight")]
        sd[k] = (w / scale).clamp(-448, 448).to(torch.float8_e4m3fn)
        sd[prefix + "weight_scale"] = scale.reshape(())
        sd[prefix + "comfy_quant"] = marker.clone()
        if static_scale:
            sd[prefix + "input_scale"] = torch.tensor(INPUT_SCALE, device=dev)
        del w
    return sd


def run(args) -> dict:
    import torch

    case = CASES[args.case]
    dev = device(args.smoke)
    cfg = case.config(args.smoke)
    n_img, n_txt = case.tokens(args.smoke)
    try:
        flux_model, ops, unet_config = _import_comfy(args.comfyui, dev.type == "cpu")
    except Exception as exc:  # noqa: BLE001 - report, never fail the whole benchmark
        return {"skipped": f"ComfyUI import failed: {type(exc).__name__}: {str(exc)[:200]}"}
    try:
        import comfy_kitchen  # noqa: F401

        kitchen = True
    except ImportError:
        kitchen = False
    params = unet_config(
        cfg.hidden_size, cfg.num_heads, cfg.depth, cfg.depth_single, cfg.context_dim, cfg.guidance_embed
    )
    x = inputs(cfg, n_img, n_txt, dev)
    side = int(n_img**0.5)
    latent = x["img"].transpose(1, 2).reshape(1, 128, side, n_img // side)  # (B, 128, H/16, W/16)
    out: dict = {"kitchen": kitchen}
    for what in args.what.split(","):
        free(dev)
        try:
            if what in ("bf16", "compile"):
                model = flux_model.Flux(
                    dtype=DTYPE, device=dev, operations=ops.disable_weight_init, **params
                ).eval()
                random_init_(model, dev)
            elif what in ("fp8", "fp8-noscale"):
                if not kitchen:
                    out[what] = {"skipped": "ComfyUI's FP8 ops need comfy-kitchen"}
                    continue
                mp_ops = ops.mixed_precision_ops({}, compute_dtype=DTYPE)
                model = flux_model.Flux(dtype=DTYPE, device=dev, operations=mp_ops, **params).eval()
                sd = _fp8_state_dict(cfg, dev, static_scale=what == "fp8")
                missing, unexpected = model.load_state_dict(sd, strict=False)
                del sd
                if unexpected or missing:
                    raise RuntimeError(
                        f"state dict mismatch: missing {missing[:3]}, unexpected {unexpected[:3]}"
                    )
            else:
                raise ValueError(f"unknown anchor {what!r}")
            weights = allocated_gib(dev)
            fn = model
            if what == "compile":
                try:
                    filt = {
                        "guard_filter_fn": lambda entries: [
                            ("transformer_options" not in e.name) for e in entries
                        ]
                    }
                    fn = torch.compile(model, backend="inductor", options=filt)
                except Exception:  # noqa: BLE001 - an older torch without guard filters
                    fn = torch.compile(model, backend="inductor")
            out[what] = time_it(
                lambda: fn(latent, x["timesteps"], x["txt"], guidance=x["guidance"]),
                dev,
                args.warmup,
                args.iters,
                weights,
            )
            model = fn = None  # frees the weights before the next anchor
        except Exception as exc:  # noqa: BLE001 - one anchor that cannot run is reported, not fatal
            out[what] = {"skipped": f"{type(exc).__name__}: {str(exc)[:300]}"}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--case", required=True, choices=sorted(CASES))
    ap.add_argument("--what", default="bf16")
    ap.add_argument("--comfyui", default=os.environ.get("COMFYUI_PATH", os.path.expanduser("~/ComfyUI")))
    ap.add_argument(
        "--no-kitchen", action="store_true", help="import ComfyUI as if comfy-kitchen were absent"
    )
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--iters", type=int, default=5)
    args = ap.parse_args()
    if args.no_kitchen:
        sys.modules["comfy_kitchen"] = None  # `import comfy_kitchen` now raises ImportError
    print(json.dumps(run(args)), flush=True)


if __name__ == "__main__":
    main()
