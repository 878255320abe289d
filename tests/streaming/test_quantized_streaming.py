"""Quantized transformers (GGUF mixes, packed NVFP4, FP8) stream their stored bytes, bit for bit.

The streamer pages parameters; a quantized layer's parameters are its stored tensors (uint8 GGML
blocks, packed e2m1 + e4m3 scales, float8), so the bytes planned, pinned and copied are the file's.
"""

from __future__ import annotations

import pytest
import torch

from flux2_core import load_transformer
from flux2_core.quant import QuantLinear
from flux2_core.tiny.gguf import write_tiny_gguf_transformer
from flux2_core.tiny.transformer import write_tiny_transformer
from weight_streaming import StreamingConfig, WeightStreamer
from weight_streaming.host import BlockLayout

FORMATS = ("gguf-mixed", "gguf-Q4_K_M", "nvfp4", "fp8", "bf16")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("qstream")
    return {
        "gguf-mixed": write_tiny_gguf_transformer(root, "dev", mix="mixed", seed=5),
        "gguf-Q4_K_M": write_tiny_gguf_transformer(root, "klein-4b", mix="Q4_K_M", seed=6),
        "nvfp4": write_tiny_transformer(root / "nvfp4", "klein-4b", "nvfp4", torch.bfloat16, seed=7),
        "fp8": write_tiny_transformer(root / "fp8", "dev", "bfl-fp8", torch.bfloat16, seed=8),
        "bf16": write_tiny_transformer(root / "bf16", "klein-4b", "bfl", torch.bfloat16, seed=9),
    }


def _inputs(config, seed=0):
    g = torch.Generator().manual_seed(seed)
    n_img, n_txt = 12, 5
    img_ids = torch.zeros(1, n_img, 4)
    img_ids[0, :, 1] = torch.arange(n_img) // 4
    img_ids[0, :, 2] = torch.arange(n_img) % 4
    txt_ids = torch.zeros(1, n_txt, 4)
    txt_ids[..., 3] = torch.arange(n_txt)
    return dict(
        img=torch.randn(1, n_img, 128, generator=g),
        img_ids=img_ids,
        txt=torch.randn(1, n_txt, config.context_dim, generator=g),
        txt_ids=txt_ids,
        timesteps=torch.tensor([0.7]),
        guidance=torch.tensor([4.0]) if config.guidance_embed else None,
    )


def _stored_bytes(block) -> int:
    return sum(p.numel() * p.element_size() for p in block.parameters())


@pytest.mark.parametrize(
    ("fmt", "dtype"),
    [(f, torch.float32) for f in FORMATS] + [("gguf-mixed", torch.bfloat16), ("nvfp4", torch.bfloat16)],
)
def test_streamed_equals_resident_bit_for_bit(files, fmt, dtype):
    model = load_transformer(files[fmt], dtype=dtype, keep_fp8=True)
    quant = [m for m in model.modules() if isinstance(m, QuantLinear)]
    assert bool(quant) == (fmt != "bf16")
    x = _inputs(model.config)
    with torch.no_grad():
        want = model(**x)
    blocks = [*model.double_blocks, *model.single_blocks]
    sizes = [BlockLayout.of(b, "b").nbytes for b in blocks]
    fixed = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if "_blocks." not in n)
    budget = fixed + 2 * max(sizes) + min(sizes)  # a ring of two slots and about one resident block
    with torch.no_grad(), WeightStreamer(model, StreamingConfig(vram_budget=budget), "cpu") as ws:
        assert len(ws.plan.streamed_indices) >= len(blocks) - 1
        # what is planned and copied is what the blocks store (quantized bytes, not dequantized ones)
        assert ws.plan.streamed_bytes == sum(sizes[i] for i in ws.plan.streamed_indices)
        for i in ws.plan.streamed_indices:
            assert sizes[i] - _stored_bytes(blocks[i]) < 256 * len(list(blocks[i].parameters()))
        # during the forward, a streamed layer's stored tensors are views of a ring slot
        ring = [(s.buf.data_ptr(), s.buf.data_ptr() + s.buf.numel()) for s in ws.ring.slots]
        layer = next(
            m
            for m in blocks[ws.plan.streamed_indices[0]].modules()
            if isinstance(m, torch.nn.Linear | QuantLinear)
        )
        seen = []
        hook = layer.register_forward_pre_hook(lambda m, a: seen.append(m.weight.data_ptr()))
        for step in range(2):
            got = model(**x)
            assert torch.equal(got, want), (fmt, step)
        hook.remove()
        assert len(seen) == 2 and all(any(lo <= p < hi for lo, hi in ring) for p in seen)


def test_quantized_blocks_are_smaller_by_their_bits_per_weight(files):
    dense = load_transformer(files["bf16"], dtype=torch.bfloat16)
    packed = load_transformer(files["nvfp4"], dtype=torch.bfloat16)
    q4 = load_transformer(files["gguf-Q4_K_M"], dtype=torch.bfloat16)
    b16 = _stored_bytes(dense.single_blocks[0])
    # NVFP4: 4 bits + one e4m3 scale per 16 values = 4.5 bits; Q4_K/Q6_K mix of a single block
    # (linear1 Q4_K at 4.5 bits, linear2 Q6_K at 6.5625 bits) plus the two F32 norm scales.
    assert _stored_bytes(packed.single_blocks[0]) / b16 == pytest.approx(4.5 / 16, rel=0.02)
    assert 4.5 / 16 < _stored_bytes(q4.single_blocks[0]) / b16 < 6.6 / 16
