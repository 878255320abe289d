"""FP8 / NVFP4 dequantization, checked against comfy-kitchen's eager reference where installed."""

import pytest
import torch

from flux2_core.quant import FP8Linear, dequantize_fp8, dequantize_nvfp4, quantize_fp8, quantize_nvfp4
from flux2_core.quant.nvfp4 import swizzle_block_scales, unswizzle_block_scales


def test_fp8_roundtrip():
    w = torch.randn(64, 48)
    q, s = quantize_fp8(w)
    assert q.dtype == torch.float8_e4m3fn and s.shape == ()
    got = dequantize_fp8(q, s, torch.float32)
    torch.testing.assert_close(got, q.float() * s)
    assert (got - w).norm() / w.norm() < 0.05


def test_swizzle_inverse():
    s = torch.randn(200, 9)
    b = swizzle_block_scales(s)
    assert b.shape == (256, 12)
    torch.testing.assert_close(unswizzle_block_scales(b, 200, 9), s)


def test_nvfp4_matches_comfy_kitchen():
    eager = pytest.importorskip("comfy_kitchen.backends.eager.quantization")
    w = torch.randn(256, 128)
    q, block, glob = quantize_nvfp4(w)
    ours = dequantize_nvfp4(q, block, glob, torch.float32)
    theirs = eager.dequantize_nvfp4(q, glob, block, output_type=torch.float32)
    torch.testing.assert_close(ours, theirs)
    assert (ours - w).norm() / w.norm() < 0.2
    # and their quantizer's output decodes the same way through ours
    q2, block2 = eager.quantize_nvfp4(w, glob)
    torch.testing.assert_close(
        dequantize_nvfp4(q2, block2, glob, torch.float32),
        eager.dequantize_nvfp4(q2, glob, block2, output_type=torch.float32),
    )


def test_fp8_linear_fallback_matches_dequantized():
    lin = FP8Linear(32, 16)
    q, s = quantize_fp8(torch.randn(16, 32))
    lin.weight.data = q
    lin.weight_scale.copy_(s)
    x = torch.randn(3, 5, 32)
    torch.testing.assert_close(lin(x), x @ (q.float() * s).t())


@pytest.mark.gpu
@pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9),
    reason="needs an FP8 GPU (SM >= 8.9)",
)
def test_fp8_linear_scaled_mm_on_gpu():
    lin = FP8Linear(256, 128).cuda()
    q, s = quantize_fp8(torch.randn(128, 256))
    lin.weight.data, lin.weight_scale.data = q.cuda(), s.cuda()
    lin.input_scale.data = torch.tensor(0.02, device="cuda")
    x = torch.randn(64, 256, device="cuda", dtype=torch.bfloat16)
    ref = x.float() @ (q.cuda().float() * s.cuda()).t()
    assert (lin(x).float() - ref).norm() / ref.norm() < 0.08
