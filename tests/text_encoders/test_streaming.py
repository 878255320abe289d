"""The decoder layers are streamable blocks: the weight-streaming manager pages them, results unchanged."""

from __future__ import annotations

import torch
from torch.testing import assert_close

from weight_streaming import StreamingConfig, WeightStreamer


def test_streamed_encode_equals_resident(encoder):
    enc = encoder("mistral3", "comfyui-fp8")  # fp8 blocks: the manager moves float8 weights and scales
    expected = enc.encode("a cat", use_cache=False)
    fixed = sum(p.numel() * p.element_size() for n, p in enc.named_parameters() if ".layers." not in n)
    block = sum(p.numel() * p.element_size() for p in enc.model.layers[0].parameters())
    streamer = WeightStreamer(enc, StreamingConfig(vram_budget=fixed + 8 * block), device="cpu")
    plan = streamer.attach()
    try:
        assert len(plan.resident) == 30 and 0 < sum(plan.resident) < 30  # some layers are paged
        assert_close(enc.encode("a cat", use_cache=False), expected)
    finally:
        streamer.detach()


def test_weight_source_reads_file_tensors(encoder):
    enc = encoder("qwen3-8b", "comfyui-bundled")
    name = "model.layers.3.mlp.up_proj.weight"
    param = enc.get_parameter(name)
    out = torch.empty_like(param)
    enc.weight_source.read_into(name, out)  # file is bf16, model float32: converted on the way
    assert_close(out, param)
    raw = torch.empty(param.shape, dtype=torch.bfloat16)
    enc.weight_source.read_into(name, raw)  # stored dtype: straight from the file
    assert_close(raw.float(), param)


def test_streamed_generator_upsamples_like_resident(tiny_file):
    """The generator's decoder layers are streamable blocks too: paged, it writes the same text."""
    from flux2_core import load_text_encoder

    enc = load_text_encoder(tiny_file("qwen3-4b", "hf"), dtype=torch.float32, cache=None)
    gen = enc.generator()
    expected = gen.upsample("a cat", seed=3, max_new_tokens=8)
    block = sum(p.numel() * p.element_size() for p in gen.layers[0].parameters())
    fixed = sum(
        p.numel() * p.element_size() for n, p in gen.named_parameters() if not n.startswith("layers.")
    )
    streamer = WeightStreamer(gen, StreamingConfig(vram_budget=fixed + 8 * block), device="cpu")
    plan = streamer.attach()
    try:
        assert len(plan.resident) == 36 and 0 < sum(plan.resident) < 36
        assert gen.upsample("a cat", seed=3, max_new_tokens=8) == expected
    finally:
        streamer.detach()
    assert enc.encode("a cat", use_cache=False).shape == (1, 512, enc.context_dim)  # encoder intact
