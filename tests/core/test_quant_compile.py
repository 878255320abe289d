"""Quantized layers trace into one graph (no host syncs, no data-dependent branches): torch.compile
with fullgraph=True accepts them and computes the same values (dynamo only, eager backend on CPU)."""

import numpy as np
import pytest
import torch

from flux2_core.quant import (
    FP8Linear,
    GGUFLinear,
    NVFP4Linear,
    format_quant_summary,
    quant_summary,
    quantize_fp8,
    quantize_nvfp4,
)
from flux2_core.tiny.gguf import random_quant_blocks


def _compiled_equal(layer, x):
    torch._dynamo.reset()
    compiled = torch.compile(layer, backend="eager", fullgraph=True)  # raises on any graph break
    with torch.no_grad():
        assert torch.equal(compiled(x), layer(x))


@pytest.mark.parametrize("qtype", ["Q4_K", "Q6_K", "Q5_0", "IQ4_NL"])
def test_gguf_linear_traces_without_graph_breaks(qtype):
    layer = GGUFLinear(512, 64, qtype)
    raw = random_quant_blocks(qtype, 64, 512, 0.05, np.random.default_rng(0))
    layer.weight.data = torch.from_numpy(raw)
    _compiled_equal(layer, torch.randn(2, 5, 512))


def test_fp8_and_nvfp4_linears_trace_without_graph_breaks():
    w = torch.randn(256, 512)
    fp8 = FP8Linear(512, 256, has_input_scale=True)
    fp8.weight.data, fp8.weight_scale.data = quantize_fp8(w)
    _compiled_equal(fp8, torch.randn(3, 512))
    nv = NVFP4Linear(512, 256)
    nv.weight.data, nv.weight_scale.data, nv.weight_scale_2.data = quantize_nvfp4(w)
    _compiled_equal(nv, torch.randn(3, 512))


def test_summary_names_the_mix():
    s = quant_summary([("Q4_K", 61), ("F32", 9), ("Q6_K", 20), ("Q6_K", 10), ("F16", 0)])
    assert list(s) == ["Q4_K", "Q6_K", "F32", "F16"] and sum(s.values()) == pytest.approx(1.0)
    assert format_quant_summary(s) == "Q4_K 61%, Q6_K 30%, F32 9%, F16 <1%"
