"""The fast path on the CPU: stage functions trace without graph breaks, torch.compile (inductor's C++
backend) and comfy-kitchen's kernels are no less accurate than the eager blocks against an fp32
reference, compiler failures fall back to eager, settings resolve as documented, CUDA-graph
bookkeeping and eligibility. The same numerics on CUDA: test_fast_path_gpu.py."""

from __future__ import annotations

import logging

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
    rel_err,
    to_fp8,
)
from torch import nn

from flux2_core import Flux2KVCache
from flux2_core.fast import compiled as compiled_mod
from flux2_core.fast import graphs, settings
from flux2_core.fast.path import width_key
from flux2_core.model.blocks import EAGER_STAGES
from flux2_core.model.embeddings import ModulationOut
from flux2_core.tiny.transformer import tiny_config
from weight_streaming import StreamingConfig, WeightStreamer

# Allowed ratio of the fast path's error to the eager path's, both against fp32.
RATIO = 1.1


@pytest.fixture(autouse=True)
def _no_env(monkeypatch):
    for var in (settings.ENV_FAST, settings.ENV_GRAPHS, settings.ENV_ATTENTION):
        monkeypatch.delenv(var, raising=False)


@pytest.mark.parametrize("fp8", [False, True])
def test_stage_functions_trace_in_one_graph_each(fp8):
    """No graph breaks: each compiled stage is one kernel region (a break would split fusions)."""
    cfg = tiny_config("klein-4b", depth=1, depth_single=1)
    model = build(cfg, torch.bfloat16, "cpu")
    if fp8:
        to_fp8(model, {n: 0.01 for n in block_linear_names(model)})
    for name, (graphs_n, breaks) in explain_stages(model, torch.bfloat16, "cpu").items():
        assert graphs_n == 1 and not breaks, (name, breaks)


def test_single_post_empties_the_handed_over_list():
    """The eager post stage takes sole ownership of the attention output and h (the activation peak)."""
    cfg = tiny_config("klein-4b", depth=0, depth_single=1)
    model = build(cfg, torch.float32, "cpu")
    blk = model.single_blocks[0]
    x = torch.randn(1, 8, cfg.hidden_size)
    parts = [torch.randn(1, 8, cfg.num_heads, 128), torch.randn(1, 8, blk.split[0] + blk.split[1])]
    EAGER_STAGES.single_post(blk, x, parts, ModulationOut(*(torch.zeros(1, 1, cfg.hidden_size),) * 3))
    assert parts == []


def test_compiled_bf16_is_no_less_accurate_than_eager_and_streams():
    """torch.compile (CPU inductor) of every stage vs eager, both in bf16 against fp32 on the same weights.
    Then the compiled stages under the weight streamer give the resident compiled output exactly."""
    cfg = tiny_config("dev", depth=1, depth_single=1)
    x = inputs_for(cfg, "cpu", n_img=64, n_txt=24)
    ref = build(cfg, torch.float32, "cpu")
    model = build(cfg, torch.bfloat16, "cpu")
    with torch.inference_mode():
        ref_out = ref(**x)
    errs = errors_by_mode(model, ref_out, x)
    stages = compiled_mod.compiled_stages(width_key(cfg))
    for name in ("double_pre", "double_post", "single_pre", "single_post"):
        assert getattr(stages, name).failed is None, getattr(stages, name).failed
    assert errs["compile"] <= RATIO * errs["eager"], errs
    assert 0 < errs["eager"] < 0.05

    model.fast_path = "compile"
    with torch.inference_mode():
        resident = model(**x)
        assert model.fast.last_mode == "compile"
        # Budget 0 streams every block: both run from the ring, their parameters swapped per call.
        with WeightStreamer(model, StreamingConfig(vram_budget=0, pin_memory=False), "cpu") as ws:
            assert ws.plan.streamed_indices == [0, 1]
            streamed = model(**x)
    assert torch.equal(streamed, resident)


def test_compiled_fp8_weight_only_is_no_less_accurate_than_eager():
    """FP8 weights where the matmul runs in bf16 (no FP8 tensor cores: CPU, RTX 3090): the compiled
    dequantization against the eager one, both against fp32 with the same (dequantized) weights."""
    cfg = tiny_config("klein-4b", depth=0, depth_single=1)
    x = inputs_for(cfg, "cpu", n_img=48, n_txt=16)
    model = build(cfg, torch.bfloat16, "cpu")
    to_fp8(model, calibrate_input_scales(model, x))
    ref = fp32_reference_of(model, cfg, "cpu")
    with torch.inference_mode():
        ref_out = ref(**x)
    errs = errors_by_mode(model, ref_out, x)
    assert errs["compile"] <= RATIO * errs["eager"], errs
    assert 0 < errs["eager"] < 0.05


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kitchen_stages_match_the_eager_blocks(dtype):
    """comfy-kitchen's adaln / rms_rope in place of our LN + modulation and QK-norm + RoPE (here its CPU
    backend): the same function (fp32: to rounding; bf16: as accurate against fp32), batch of two,
    and the KV variant's per-token modulation."""
    cfg = tiny_config("klein-9b-kv", depth=2, depth_single=2)
    ref = build(cfg, torch.float32, "cpu")
    model = build(cfg, dtype, "cpu")
    g = torch.Generator().manual_seed(3)
    x = inputs_for(cfg, "cpu", n_img=16, n_txt=8)
    x = {
        k: (None if v is None else torch.cat([v, v + 0.1 * torch.randn(v.shape, generator=g)]))
        for k, v in x.items()
    }
    x["timesteps"] = torch.tensor([0.7, 0.3])
    ref_img = torch.randn(2, 12, 128, generator=g)
    ref_ids = torch.zeros(2, 12, 4)
    ref_ids[..., 0] = 10
    ref_ids[..., 2] = torch.arange(12)
    with torch.inference_mode():
        want = ref(**x, ref_img=ref_img, ref_ids=ref_ids, kv_cache=Flux2KVCache())
        outs = {}
        for mode in ("eager", "kitchen"):
            model.fast_path = mode
            outs[mode] = model(**x, ref_img=ref_img, ref_ids=ref_ids, kv_cache=Flux2KVCache()).float()
    assert model.fast.last_mode == "kitchen"
    if dtype == torch.float32:
        torch.testing.assert_close(outs["kitchen"], outs["eager"], rtol=1e-4, atol=1e-5)
    else:
        # comfy-kitchen's CPU code rounds LN and modulation separately (its CUDA kernel fuses them; the
        # GPU test holds that one to the 1.1x bound), so it gets a looser bound here.
        e, k = rel_err(outs["eager"], want), rel_err(outs["kitchen"], want)
        assert k <= 1.5 * e, (k, e)


def test_compiler_failure_falls_back_to_eager_and_oom_propagates(monkeypatch, caplog):
    cfg = tiny_config("klein-4b", depth=1, depth_single=1).replace(mlp_ratio=2.0)  # its own width key
    compiled_mod.reset_compiled()

    def broken_compile(fn, **kw):
        def run(*a):
            raise RuntimeError("inductor exploded")

        return run

    monkeypatch.setattr(torch, "compile", broken_compile)
    model = build(cfg, torch.float32, "cpu")
    x = inputs_for(cfg, "cpu", n_img=16, n_txt=8)
    with torch.inference_mode():
        want = model(**x)
        model.fast_path = "compile"
        with caplog.at_level(logging.WARNING, logger="flux2_core.fast.compiled"):
            got = model(**x)
    assert torch.equal(got, want)
    stages = compiled_mod.compiled_stages(width_key(cfg))
    assert "inductor exploded" in stages.double_pre.failed
    assert "runs eager from now on" in caplog.text
    compiled_mod.reset_compiled()

    def oom(*a):
        raise torch.OutOfMemoryError("CUDA out of memory")

    stage = compiled_mod.CompiledStage(lambda *a: 1, oom, "probe")
    with pytest.raises(torch.OutOfMemoryError):
        stage()
    assert stage.failed is None
    compiled_mod.reset_compiled()


def test_settings_resolve_as_documented(monkeypatch):
    cpu = torch.device("cpu")
    assert settings.resolve_mode("auto", cpu) == "eager"  # auto compiles on CUDA only
    assert settings.resolve_mode("compile", cpu) == "compile"
    assert settings.resolve_mode("off", cpu) == "eager"
    monkeypatch.setenv(settings.ENV_FAST, "0")
    assert settings.requested_mode("auto") == "eager"
    assert settings.requested_mode("compile") == "compile"  # an explicit core setting wins
    monkeypatch.setenv(settings.ENV_FAST, "compile")
    assert settings.resolve_mode("auto", cpu) == "compile"
    monkeypatch.setenv(settings.ENV_FAST, "fastest")
    with pytest.raises(ValueError, match="FLUX2LOCAL_FAST"):
        settings.requested_mode("auto")
    monkeypatch.delenv(settings.ENV_FAST)
    ok, why = settings.kitchen_available(cpu)
    assert not ok and why
    ok, why = settings.compile_available(torch.device("cuda"))
    assert isinstance(ok, bool) and why
    monkeypatch.setenv(settings.ENV_GRAPHS, "0")
    assert settings.requested_graphs("auto") == "off"
    assert settings.requested_graphs("on") == "on"


def test_compile_without_triton_on_cuda_falls_back_with_a_reason(monkeypatch):
    real = settings.importlib.util.find_spec
    monkeypatch.setattr(
        settings.importlib.util, "find_spec", lambda n: None if n in ("triton", "comfy_kitchen") else real(n)
    )
    ok, why = settings.compile_available(torch.device("cuda"))
    assert not ok and "Triton" in why
    ok, why = settings.kitchen_available(torch.device("cuda"))
    assert not ok and "not installed" in why
    assert settings.resolve_mode("auto", torch.device("cuda")) == "eager"


class _Odd(nn.Module):
    def forward(self, x):
        return x


def test_cuda_graph_eligibility_refuses_hooks_patched_forwards_and_unknown_modules():
    cfg = tiny_config("klein-4b", depth=1, depth_single=1)
    model = build(cfg, torch.float32, "cpu")
    assert graphs.structural_reason(model) is None
    h = model.single_blocks[0].linear1.register_forward_hook(lambda *a: None)
    assert "hooks" in graphs.structural_reason(model)
    h.remove()
    model.double_blocks[0].forward = lambda *a, **k: None
    assert "patched forward" in graphs.structural_reason(model)
    del model.double_blocks[0].forward
    model.single_blocks[0].extra = _Odd()
    assert "_Odd" in graphs.structural_reason(model)
    del model.single_blocks[0].extra
    assert graphs.ineligible_reason(model, torch.device("cpu")) == "not on CUDA"


class _FakeGraph:
    """Stands in for torch.cuda.CUDAGraph on the CPU: replay re-runs the captured function."""

    def __init__(self, fn, static, out):
        self.fn, self.static, self.out = fn, static, out

    def replay(self):
        self.out.copy_(self.fn(**self.static))


def test_graph_runner_keys_by_shapes_and_weight_addresses(monkeypatch):
    runner = graphs.GraphRunner()
    calls = []
    lin = nn.Linear(4, 4)

    def fn(x):
        calls.append(x.shape)
        return lin(x)

    def fake_capture(self, f, inputs):
        static = {k: v.clone() for k, v in inputs.items()}
        out = f(**static)
        return graphs._Captured(_FakeGraph(f, static, out), static, out)

    monkeypatch.setattr(graphs.GraphRunner, "_capture", fake_capture)
    x1, x2 = torch.randn(2, 4), torch.randn(2, 4)
    with torch.no_grad():
        a = runner(fn, lin, {"x": x1})  # first: plain run
        assert runner.captures == 0
        b = runner(fn, lin, {"x": x2})  # second: captured, then replayed
        assert runner.captures == 1 and runner.replays == 1
        c = runner(fn, lin, {"x": x1})  # later: the inputs are copied in, replayed
        assert runner.replays == 2
        torch.testing.assert_close(a, lin(x1))
        torch.testing.assert_close(b, lin(x2))
        torch.testing.assert_close(c, lin(x1))
        c.add_(1)  # the caller owns its output: the next replay does not write into it
        runner(fn, lin, {"x": x2})
        torch.testing.assert_close(c, lin(x1) + 1)
        lin.weight.data = lin.weight.data.clone()  # the weights moved: a new key
        runner(fn, lin, {"x": x1})
        assert runner.captures == 1
        runner(fn, lin, {"x": x1})
        assert runner.captures == 2 and len(runner._graphs) == 1  # graphs of the old weights dropped
        runner(fn, lin, {"x": torch.randn(3, 4)})
        runner(fn, lin, {"x": torch.randn(3, 4)})
        runner(fn, lin, {"x": torch.randn(5, 4)})
        runner(fn, lin, {"x": torch.randn(5, 4)})
        assert len(runner._graphs) == graphs.MAX_GRAPHS
    runner.release()
    assert not runner._graphs
