"""Every GGML type decodes exactly like the gguf package's numpy reference (float32), on random
blocks with zero, subnormal, tiny and extreme fp16 scales (K-quants built as raw bytes: the gguf
package cannot quantize them)."""

import gguf
import numpy as np
import pytest
import torch

from flux2_core.quant import GGML_TYPES, GGUFLinear, dequantize_ggml

# byte offsets of each type's fp16 scale fields (d, dmin / m)
F16_FIELDS = {
    "Q8_0": [0],
    "Q4_0": [0],
    "Q4_1": [0, 2],
    "Q5_0": [0],
    "Q5_1": [0, 2],
    "IQ4_NL": [0],
    "IQ4_XS": [0],
    "Q2_K": [80, 82],
    "Q3_K": [108],
    "Q4_K": [0, 2],
    "Q5_K": [0, 2],
    "Q6_K": [208],
}
# zero, fp16 subnormals (Q4_K/Q5_K scales in real files sit around 3e-5 to 6e-5), the largest fp16
SCALES = np.array([0.0, -0.0, 3.1e-5, -5.9e-5, 6e-8, 1e-4, 0.013, -1.0, 65504.0, -65504.0], dtype=np.float16)
QUANTIZED = [n for n, t in GGML_TYPES.items() if t.quantized]


def _random_blocks(name, rows, cols, seed):
    t = GGML_TYPES[name]
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, (rows, t.row_bytes(cols)), dtype=np.uint8)
    blocks = raw.reshape(-1, t.type_size)
    for off in F16_FIELDS[name]:
        blocks[:, off : off + 2] = rng.choice(SCALES, blocks.shape[0]).view(np.uint8).reshape(-1, 2)
    blocks[0, :] = 0  # an all-zero block
    blocks[1, :] = 255  # all code bits set (scale fields set again below)
    for off in F16_FIELDS[name]:
        blocks[1, off : off + 2] = np.array([65504.0], dtype=np.float16).view(np.uint8)
    return raw


def test_every_listed_type_is_covered():
    assert set(QUANTIZED) == set(F16_FIELDS)
    assert set(GGML_TYPES) >= {
        "F32", "F16", "BF16", "Q8_0", "Q6_K", "Q5_K", "Q5_0", "Q5_1", "Q4_K", "Q4_0", "Q4_1", "Q3_K", "Q2_K",
        "IQ4_NL", "IQ4_XS",
    }  # fmt: skip
    for name, t in GGML_TYPES.items():  # block geometry as the gguf package defines it
        assert (t.block, t.type_size) == gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[name]]
        assert t.type_id == int(gguf.GGMLQuantizationType[name])


@pytest.mark.parametrize("name", QUANTIZED)
def test_dequantize_equals_gguf_reference_exactly(name):
    t = GGML_TYPES[name]
    rows, cols = 7, 3 * t.block
    raw = _random_blocks(name, rows, cols, seed=QUANTIZED.index(name))
    ref = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType[name])
    ours = dequantize_ggml(torch.from_numpy(raw), t, (rows, cols), torch.float32)
    assert ours.shape == ref.shape == (rows, cols)
    np.testing.assert_array_equal(ours.numpy(), ref)  # bit for bit (signed zeros compare equal)
    assert np.isfinite(ref).all() and np.abs(ref).max() > 1e4 and (ref == 0).any()


@pytest.mark.parametrize("name", ["Q8_0", "Q4_K", "Q6_K", "IQ4_XS"])
def test_row_chunks_and_output_dtype(name, monkeypatch):
    import flux2_core.quant.ggml as ggml

    t = GGML_TYPES[name]
    raw = torch.from_numpy(_random_blocks(name, 9, 2 * t.block, seed=1))
    full = dequantize_ggml(raw, t, (9, 2 * t.block), torch.float32)
    monkeypatch.setattr(ggml, "_CHUNK_VALUES", 2 * t.block * 2)  # two rows per slice
    np.testing.assert_array_equal(
        dequantize_ggml(raw, t, (9, 2 * t.block), torch.float32).numpy(), full.numpy()
    )
    out = torch.empty(9, 2 * t.block, dtype=torch.bfloat16)
    dequantize_ggml(raw, t, (9, 2 * t.block), torch.bfloat16, out=out)
    assert torch.equal(out, full.to(torch.bfloat16))  # float32 math, rounded once


@pytest.mark.parametrize("name", ["F16", "BF16"])
def test_plain_types(name):
    w = torch.randn(4, 64)
    t = GGML_TYPES[name]
    if name == "F16":
        raw = w.half().view(torch.uint8)
        ref = gguf.quants.dequantize(w.half().numpy(), gguf.GGMLQuantizationType.F16)
    else:
        raw = w.bfloat16().view(torch.uint8)
        ref = gguf.quants.dequantize(raw.numpy(), gguf.GGMLQuantizationType.BF16)
    np.testing.assert_array_equal(dequantize_ggml(raw, t, (4, 64)).numpy(), ref)


def test_gguf_linear_forward_is_the_dequantized_matmul():
    t = GGML_TYPES["Q5_K"]
    raw = _random_blocks("Q5_K", 48, 512, seed=4)
    raw.reshape(-1, t.type_size)[:, :4] = np.array([1e-3, 5e-4], dtype=np.float16).view(
        np.uint8
    )  # sane scales
    lin = GGUFLinear(512, 48, "Q5_K")
    lin.weight.data = torch.from_numpy(raw)
    w = torch.from_numpy(gguf.quants.dequantize(raw, gguf.GGMLQuantizationType.Q5_K))
    x = torch.randn(2, 3, 512)
    assert torch.equal(lin.dequantized(torch.float32), w)
    torch.testing.assert_close(lin(x), x @ w.t(), rtol=1e-5, atol=1e-5)
    assert lin(x.bfloat16()).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="multiple of 256"):
        GGUFLinear(100, 4, "Q4_K")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("decoder", ["torch", "triton", "compile"])
def test_gpu_decoders_equal_the_reference(decoder, monkeypatch):
    import flux2_core.quant.ggml as ggml

    monkeypatch.setenv("FLUX2LOCAL_GGUF_DECODER", decoder)
    monkeypatch.setattr(ggml, "DECODER_CALLS", {})
    for name in QUANTIZED:
        t = GGML_TYPES[name]
        raw = _random_blocks(name, 64, 2 * t.block, seed=2)
        ref = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType[name])
        got = dequantize_ggml(torch.from_numpy(raw).cuda(), t, (64, 2 * t.block), torch.float32).cpu()
        if decoder == "compile":  # inductor may reorder the float32 math
            scale = float(np.abs(ref).max())
            torch.testing.assert_close(got, torch.from_numpy(ref), rtol=1e-6, atol=1e-6 * scale, msg=name)
        else:  # every product is exact in float32: one rounding, FMA or not
            np.testing.assert_array_equal(got.numpy(), ref, err_msg=name)
            for dtype in (torch.bfloat16, torch.float16):
                low = dequantize_ggml(torch.from_numpy(raw).cuda(), t, (64, 2 * t.block), dtype)
                assert torch.equal(low.cpu(), torch.from_numpy(ref).to(dtype)), (name, dtype)
    assert not ggml._COMPILE_FAILED and not ggml._TRITON_FAILED
    if decoder == "triton":  # every type with a kernel really ran it (IQ4_* decode with torch)
        assert ggml.DECODER_CALLS["triton"] == 3 * sum(n in ggml._triton_kernels().KERNELS for n in QUANTIZED)
