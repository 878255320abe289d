"""diffusers anchor for the streaming benchmark: group offload on FLUX.2 [dev] (random bf16 weights).

Used by `tests/benchmarks/streaming.py` (not a script of its own); the weights are handed over already
pinned, one pinned allocation per tensor (see the note in the figures).
"""

from __future__ import annotations

import gc
import statistics
import time

import torch

GiB = 1 << 30
DEV = torch.device("cuda")


def diffusers_anchor(inputs, steps, bw, resident_step, small, materialize_random, timed_steps) -> dict:
    """diffusers' group offload (block level, one block a group, use_stream=True) on the same shapes."""
    try:
        from diffusers import Flux2Transformer2DModel
        from diffusers.hooks import apply_group_offloading
    except Exception as exc:  # noqa: BLE001
        return dict(skipped=f"diffusers not importable: {type(exc).__name__}: {exc}")
    kw = dict(num_attention_heads=12) if small else {}
    with torch.device("meta"):
        model = Flux2Transformer2DModel(**kw).to(torch.bfloat16)
    build_s = materialize_random(model, pinned=True)
    model.eval()
    block_bytes = sum(
        p.numel() * p.element_size()
        for lst in (model.transformer_blocks, model.single_transformer_blocks)
        for p in lst.parameters()
    )
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    apply_group_offloading(
        model,
        onload_device=DEV,
        offload_device=torch.device("cpu"),
        offload_type="block_level",
        num_blocks_per_group=1,
        use_stream=True,
    )
    torch.cuda.synchronize()
    load_s = time.perf_counter() - t0
    d_in = dict(
        hidden_states=inputs["img"],
        encoder_hidden_states=inputs["txt"],
        timestep=inputs["timesteps"],
        img_ids=inputs["img_ids"],
        txt_ids=inputs["txt_ids"],
        guidance=inputs["guidance"],
        return_dict=False,
    )
    times = timed_steps(lambda: model(**d_in), steps)
    steady = statistics.median(times[1:])
    bound = max(resident_step, block_bytes / bw)
    res = dict(
        steady_s=steady,
        first_s=times[0],
        bound_s=bound,
        ratio=steady / bound,
        first_over_steady=times[0] / steady,
        streamed_gib=block_bytes / GiB,
        peak_reserved_gib=torch.cuda.max_memory_reserved() / GiB,
        load_s=load_s,
        build_s=build_s,
        steps=[round(t, 4) for t in times],
        note="weights handed over already pinned (one pinned allocation per tensor), so load_s excludes the "
        "90-108 s that pinning them took in earlier measurements on this machine kind",
    )
    model = None  # noqa: F841 - drop the last reference before the next anchor
    gc.collect()
    torch.cuda.empty_cache()
    return res
