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
    import comfy_kitchen.backends.eager.quantization as eager

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


def test_fp8_per_row_dequantizes_in_fp32_and_rounds_once():
    w = torch.randn(40, 64) * torch.logspace(-3, 1, 40)[:, None]  # rows of very different size
    q, s = quantize_fp8(w, per_row=True)
    assert s.shape == (40, 1)
    lin = FP8Linear(64, 40, has_input_scale=False, per_row=True)
    lin.weight.data, lin.weight_scale.data = q, s
    exact = q.float() * s
    assert torch.equal(lin.dequantized(torch.float32), exact)
    assert torch.equal(lin.dequantized(torch.bfloat16), exact.to(torch.bfloat16))  # one rounding
    assert (exact - w).norm() / w.norm() < 0.05
    x = torch.randn(5, 64)
    torch.testing.assert_close(lin(x), x @ exact.t())
    assert lin.storage == "FP8_E4M3_ROW" and lin.input_scale is None


def test_text_encoder_fp8_layer_is_the_shared_class():
    from flux2_core.text_encoders.fp8 import Fp8Linear

    assert Fp8Linear is FP8Linear


def test_nvfp4_linear_keeps_packed_bytes_and_matches_the_dequantized_weight():
    from flux2_core.quant import NVFP4Linear

    w = torch.randn(256, 512)
    q, block, glob = quantize_nvfp4(w)
    lin = NVFP4Linear(512, 256)
    lin.weight.data, lin.weight_scale.data, lin.weight_scale_2.data = q, block, glob
    assert lin.weight.dtype == torch.uint8 and lin.weight.shape == (256, 256)
    assert lin.weight_scale.dtype == torch.float8_e4m3fn
    bits = 8 * lin.stored_bytes() / w.numel()
    assert bits == pytest.approx(4.5, abs=0.01)  # e2m1 pairs + one e4m3 scale per 16 values (+ 4 bytes)
    ref = dequantize_nvfp4(q, block, glob, torch.float32)
    x = torch.randn(3, 512)
    assert torch.equal(lin(x), x @ ref.t())
