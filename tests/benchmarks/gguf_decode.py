"""GGUF decode micro-benchmark (``quantized.py --parts decode``): one [dev] single-block ``linear1``
(55296 x 6144 values) decoded into a bf16 scratch buffer, per GGML type and decoder.

For each (type, decoder) it prints the median time, the effective rate (stored bytes read + bf16
bytes written, GB/s), values per second, the decoder that really ran (a failing fused decoder falls
back to torch) and whether the output equals the torch decoders' bit for bit; against the bound of
writing the bf16 values alone (``fill_`` of the same buffer, timed in the same run) as a ratio.
In ``--smoke`` mode (CPU, 64 x 512) the Triton kernels run in Triton's interpreter when
``TRITON_INTERPRET=1`` is set (checks the script, not a speed).
"""

from __future__ import annotations

import os
import statistics
import time

import torch

from flux2_core.quant import GGML_TYPES, dequantize_ggml
from flux2_core.quant import ggml as ggml_mod
from flux2_core.tiny.gguf import F16_FIELDS

TYPES = ("Q8_0", "Q4_K", "Q5_K", "Q6_K", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q3_K", "Q2_K")
DECODERS = ("torch", "triton", "compile")
LINEAR1 = (55296, 6144)  # [dev] single block: H = 6144 -> 3H + 2M = 18432 + 36864 outputs
SMOKE_SHAPE = (64, 512)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(fn, device: torch.device, iters: int, warmup: int) -> float:
    """Median seconds of ``fn`` (CUDA events on the GPU, wall clock on the CPU)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b) / 1e3)
        else:
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
    return statistics.median(times)


def random_blocks(name: str, rows: int, cols: int, device: torch.device) -> torch.Tensor:
    """(rows, row bytes) random codes with finite fp16 scales (1e-3): the speed does not depend on values."""
    t = GGML_TYPES[name]
    g = torch.Generator(device=device).manual_seed(0)
    raw = torch.randint(0, 256, (rows, t.row_bytes(cols)), dtype=torch.uint8, device=device, generator=g)
    blocks = raw.view(-1, t.type_size)
    scale = torch.tensor([1e-3], dtype=torch.float16, device=device).view(torch.uint8)
    for offset, _ in F16_FIELDS[name]:
        blocks[:, offset : offset + 2] = scale
    return raw


def decoders_for(device: torch.device) -> list[str]:
    if device.type == "cuda":
        return list(DECODERS)
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    return ["torch", "triton"] if interpreted else ["torch"]


def run_decode_bench(device: torch.device, smoke: bool, types: list[str], decoders: list[str], log) -> dict:
    """Time every (type, decoder); returns the figures (rows and the write bound)."""
    rows_n, cols = SMOKE_SHAPE if smoke else LINEAR1
    iters, warmup = (2, 1) if smoke else (10, 3)
    out = torch.empty(rows_n, cols, dtype=torch.bfloat16, device=device)
    write_s = _time(lambda: out.fill_(1.0), device, iters, warmup)
    out_bytes = out.numel() * out.element_size()
    log(
        f"[decode] {rows_n} x {cols} into bf16 ({out_bytes / 1e9:.2f} GB): bf16 write bound "
        f"{write_s * 1e3:.3f} ms ({out_bytes / write_s / 1e9:.0f} GB/s)"
    )
    saved = os.environ.get(ggml_mod.ENV_DECODER)
    results = []
    try:
        for name in types:
            t = GGML_TYPES[name]
            raw = random_blocks(name, rows_n, cols, device)
            ref = None
            for dec in decoders:
                os.environ[ggml_mod.ENV_DECODER] = dec
                before = dict(ggml_mod.DECODER_CALLS)

                def step(raw=raw, t=t):
                    dequantize_ggml(raw, t, (rows_n, cols), torch.bfloat16, out=out)

                first = time.perf_counter()
                step()  # first call: compiles (Triton JIT, torch.compile) where the decoder does
                _sync(device)
                first_s = time.perf_counter() - first
                ran = sorted(k for k, v in ggml_mod.DECODER_CALLS.items() if v > before.get(k, 0))
                got = out.clone()
                if ref is None and dec == "torch":
                    ref = got
                exact = (
                    None if ref is None else bool(torch.equal(got.view(torch.int16), ref.view(torch.int16)))
                )
                sec = _time(step, device, iters, warmup)
                moved = raw.numel() + out_bytes
                row = dict(
                    type=name,
                    decoder=dec,
                    ran="+".join(ran),
                    ms=sec * 1e3,
                    first_s=first_s,
                    gbps=moved / sec / 1e9,
                    gvalues_per_s=out.numel() / sec / 1e9,
                    over_write_bound=sec / write_s,
                    exact_vs_torch=exact,
                )
                results.append(row)
                log(
                    f"[decode] {name:>5} {dec:>7} (ran {row['ran']}): {row['ms']:.3f} ms, {row['gbps']:.3g} GB/s "
                    f"moved, {row['gvalues_per_s']:.1f} Gvalues/s, {row['over_write_bound']:.2f}x the write bound, "
                    f"first {first_s:.2f} s, equal to torch {exact}"
                )
            del raw, ref
    finally:
        if saved is None:
            os.environ.pop(ggml_mod.ENV_DECODER, None)
        else:
            os.environ[ggml_mod.ENV_DECODER] = saved
    log("")
    log("| type | decoder | ran | ms | GB/s moved | x write bound | equal to torch |")
    log("|---|---|---|---|---|---|---|")
    for r in results:
        log(
            f"| {r['type']} | {r['decoder']} | {r['ran']} | {r['ms']:.3f} | {r['gbps']:.3g} | "
            f"{r['over_write_bound']:.2f} | {r['exact_vs_torch']} |"
        )
    return dict(shape=[rows_n, cols], write_bound_ms=write_s * 1e3, rows=results)
