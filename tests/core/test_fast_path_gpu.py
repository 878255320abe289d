"""The fast path on CUDA (run on the lent GPU): at full model width, its error against an fp32 reference
of the same weights and inputs is at most 1.1x the eager path's in bf16 and in FP8 (static input
scales through torch._scaled_mm, and the weight-only path of GPUs without FP8 tensor cores); CUDA
graphs replay exactly what they captured; compiled stages under the weight streamer give the resident
output exactly; the optional quantized attention backends' error against SDPA is reported."""

from __future__ import annotations

import pytest
import torch
from fast_numerics import (
    block_linear_names,
    build,
    calibrate_input_scales,
    errors_by_mode,
    explain_stages,
    fp32_reference_of,
    inputs_for,
    to_fp8,
)

from flux2_core import Flux2Config
from flux2_core.fast import attention as attn_mod
from flux2_core.fast import settings
from weight_streaming import StreamingConfig, WeightStreamer

pytestmark = pytest.mark.gpu

RATIO = 1.1
CUDA = "cuda"
UNLIMITED_BUDGET = 1 << 62


@pytest.fixture(autouse=True)
def _no_env(monkeypatch):
    for var in (settings.ENV_FAST, settings.ENV_GRAPHS, settings.ENV_ATTENTION):
        monkeypatch.delenv(var, raising=False)


def _wide(variant: str = "dev", depth: int = 1, depth_single: int = 2) -> Flux2Config:
    """Full width and context of a preset, a few blocks (the fp32 reference must fit next to it)."""
    return Flux2Config.from_name(variant).replace(variant="custom", depth=depth, depth_single=depth_single)


def _modes() -> tuple[str, ...]:
    ok, _ = settings.kitchen_available(torch.device(CUDA))
    return ("eager", "compile", "kitchen") if ok else ("eager", "compile")


def _check(errs: dict[str, float]) -> None:
    print(f"relative error against fp32: {errs}")
    for mode, e in errs.items():
        if mode != "eager":
            assert e <= RATIO * errs["eager"], (mode, errs)


@pytest.mark.parametrize("fp8", [False, True])
def test_stages_trace_in_one_graph_each_on_cuda(fp8):
    """No graph breaks on CUDA either, also through the FP8 layers' scaled-matmul forward: the FP8
    activation quantization then fuses into the kernel that produces the activation."""
    if fp8 and torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("needs FP8 tensor cores (SM >= 8.9) for the scaled-matmul path")
    cfg = Flux2Config.from_name("klein-4b").replace(variant="custom", depth=1, depth_single=1)
    model = build(cfg, torch.bfloat16, CUDA)
    if fp8:
        to_fp8(model, {n: 0.01 for n in block_linear_names(model)})
    for name, (graphs_n, breaks) in explain_stages(model, torch.bfloat16, CUDA).items():
        assert graphs_n == 1 and not breaks, (name, breaks)


def test_bf16_fast_paths_are_no_less_accurate_than_eager():
    cfg = _wide("dev")
    x = inputs_for(cfg, CUDA, n_img=4096, n_txt=512)
    with torch.inference_mode():
        ref_out = build(cfg, torch.float32, CUDA)(**x)
    torch.cuda.empty_cache()
    model = build(cfg, torch.bfloat16, CUDA)
    _check(errors_by_mode(model, ref_out, x, _modes()))


@pytest.mark.parametrize("static_scales", [True, False], ids=["scaled_mm", "weight_only"])
def test_fp8_fast_paths_are_no_less_accurate_than_eager(static_scales):
    if static_scales and torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("needs FP8 tensor cores (SM >= 8.9) for the scaled-matmul path")
    cfg = _wide("dev")
    x = inputs_for(cfg, CUDA, n_img=4096, n_txt=512)
    model = build(cfg, torch.bfloat16, CUDA)
    to_fp8(model, calibrate_input_scales(model, x) if static_scales else None)
    torch.cuda.empty_cache()
    ref = fp32_reference_of(model, cfg, CUDA)
    with torch.inference_mode():
        ref_out = ref(**x)
    del ref
    torch.cuda.empty_cache()
    _check(errors_by_mode(model, ref_out, x, _modes()))


def test_cuda_graphs_replay_the_captured_forward_exactly():
    cfg = _wide("klein-4b", depth=1, depth_single=1)
    x = inputs_for(cfg, CUDA, n_img=1024, n_txt=512)
    model = build(cfg, torch.bfloat16, CUDA)
    model.fast_path = "compile"
    with torch.inference_mode():
        model.cuda_graphs = "off"
        want = model(**x)
        model.cuda_graphs = "on"
        outs = [model(**x) for _ in range(3)]  # plain, capture + replay, replay
        assert model.fast.graphs.captures == 1 and model.fast.graphs.replays == 2
        for out in outs:
            assert torch.equal(out, want)
        with torch.no_grad():
            model.single_blocks[0].linear2.weight.mul_(0.5)  # in place: the graph reads it
        model.cuda_graphs = "off"
        want2 = model(**x)
        model.cuda_graphs = "on"
        assert torch.equal(model(**x), want2) and not torch.equal(want2, want)
        model.to("cpu")  # moving the weights frees the graphs
        assert not model.fast.graphs._graphs


def test_compiled_stages_under_the_streamer_match_the_resident_run():
    cfg = _wide("klein-9b", depth=2, depth_single=4)
    x = inputs_for(cfg, CUDA, n_img=1024, n_txt=512)
    model = build(cfg, torch.bfloat16, "cpu")
    model.fast_path = "compile"
    block_bytes = sum(p.nbytes for p in model.single_blocks[0].parameters())
    with torch.inference_mode():
        with WeightStreamer(model, StreamingConfig(vram_budget=UNLIMITED_BUDGET), CUDA):
            want = model(**x)
        fixed = sum(p.nbytes for n, p in model.named_parameters() if "blocks." not in n)
        # The blocks weigh 2 x 2 + 4 = 8 single blocks; room for 5 streams some of them.
        budget = fixed + 5 * block_bytes
        with WeightStreamer(model, StreamingConfig(vram_budget=budget), CUDA) as ws:
            assert ws.plan.streamed_indices
            got = [model(**x) for _ in range(2)]
    for g in got:
        assert torch.equal(g, want)


@pytest.mark.parametrize("backend", ["kitchen-int8", "sage"])
def test_quantized_attention_error_against_sdpa(backend):
    ok, why = attn_mod._available(backend, torch.device(CUDA))
    if not ok:
        pytest.skip(f"{backend}: {why}")
    g = torch.Generator(device=CUDA).manual_seed(0)
    q, k, v = (
        torch.randn(1, 4608, 24, 128, device=CUDA, generator=g, dtype=torch.bfloat16) for _ in range(3)
    )
    errs = attn_mod.attention_error(attn_mod._FUNCTIONS[backend], q, k, v)
    print(f"{backend}: relative error against fp32 SDPA {errs['backend']:.2e} (bf16 SDPA {errs['sdpa']:.2e})")
    assert errs["backend"] < 0.1  # a layout mistake gives ~1.4; INT8 attention is a few 1e-2
