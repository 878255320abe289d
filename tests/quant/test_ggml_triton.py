"""The Triton GGML decoders, run in Triton's CPU interpreter (TRITON_INTERPRET=1): each kernel equals
gguf-py's numpy dequantizer exactly (float32) and rounds once to bf16 / fp16; a whole tiny GGUF
transformer gives the same output bit for bit through the Triton path as through the torch decoders;
the choice of decoder, the fallback on a failure and the torch.compile path."""

import importlib
import logging

import gguf
import numpy as np
import pytest
import torch
import triton  # noqa: F401

import flux2_core.quant.ggml as ggml
from flux2_core import load_transformer
from flux2_core.quant import GGML_TYPES, GGUFLinear, QuantLinear, dequantize_ggml
from flux2_core.quant.scratch import release_scratch, scratch
from flux2_core.tiny.gguf import write_tiny_gguf_transformer
from flux2_core.tiny.transformer import tiny_config

pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # fp16 -> inf

# byte offsets of each type's fp16 scale fields
F16_FIELDS = {
    "Q8_0": [0],
    "Q4_0": [0],
    "Q4_1": [0, 2],
    "Q5_0": [0],
    "Q5_1": [0, 2],
    "Q2_K": [80, 82],
    "Q3_K": [108],
    "Q4_K": [0, 2],
    "Q5_K": [0, 2],
    "Q6_K": [208],
}
# zero, signed zero, fp16 subnormals, ordinary and the largest fp16 magnitudes
SCALES = np.array([0.0, -0.0, 3.1e-5, -5.9e-5, 6e-8, 1e-4, 0.013, -1.0, 65504.0, -65504.0], dtype=np.float16)


@pytest.fixture(scope="module", autouse=True)
def kernels():
    """``ggml_triton`` re-imported under the interpreter (and re-imported as compiled kernels after)."""
    mp = pytest.MonkeyPatch()
    mp.setenv("TRITON_INTERPRET", "1")
    from flux2_core.quant import ggml_triton

    yield importlib.reload(ggml_triton)
    mp.undo()
    importlib.reload(ggml_triton)


@pytest.fixture
def triton_decoder(monkeypatch):
    monkeypatch.setenv("FLUX2LOCAL_GGUF_DECODER", "triton")
    monkeypatch.setattr(ggml, "_TRITON_FAILED", [])
    monkeypatch.setattr(ggml, "DECODER_CALLS", {})


def _blocks(name: str, n_blocks: int, seed: int) -> np.ndarray:
    """(n_blocks, type_size) random bytes: random scales from SCALES, an all-zero block, a block of
    all code bits set with the largest scale."""
    t = GGML_TYPES[name]
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, (n_blocks, t.type_size), dtype=np.uint8)
    for off in F16_FIELDS[name]:
        raw[:, off : off + 2] = rng.choice(SCALES, n_blocks).view(np.uint8).reshape(-1, 2)
    raw[0] = 0
    raw[1] = 255
    for off in F16_FIELDS[name]:
        raw[1, off : off + 2] = np.array([65504.0], dtype=np.float16).view(np.uint8)
    return raw


def _bits(x: torch.Tensor) -> torch.Tensor:
    return x.view(torch.int32 if x.dtype == torch.float32 else torch.int16)


def test_kernels_cover_the_published_types(kernels):
    assert set(kernels.KERNELS) == set(F16_FIELDS)
    assert all(kernels.KERNELS[n][1] == GGML_TYPES[n].block for n in F16_FIELDS)
    with pytest.raises(ValueError, match="stored bytes"):  # a size mismatch never reaches a kernel
        kernels.decode_into(torch.zeros(143, dtype=torch.uint8), "Q4_K", torch.empty(256))
    assert set(F16_FIELDS) >= {"Q8_0", "Q4_K", "Q5_K", "Q6_K"}


@pytest.mark.parametrize("name", sorted(F16_FIELDS))
def test_kernel_equals_gguf_reference(name, kernels, triton_decoder):
    t = GGML_TYPES[name]
    per_program = kernels.blocks_per_program(name, torch.device("cpu"))
    n_blocks = per_program + 3  # one whole program and a partial one (masked tail)
    cols = t.block * (1 if t.block == 256 else 3)
    n_blocks -= n_blocks % (cols // t.block)
    raw = _blocks(name, n_blocks, seed=sorted(F16_FIELDS).index(name)).reshape(-1, t.row_bytes(cols))
    rows = raw.shape[0]
    ref = torch.from_numpy(gguf.quants.dequantize(raw, gguf.GGMLQuantizationType[name]))
    assert torch.isfinite(ref).all() and ref.abs().max() > 1e4 and (ref == 0).any()
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        got = dequantize_ggml(torch.from_numpy(raw), t, (rows, cols), dtype)
        # bit for bit (float32), the float32 value rounded once (bf16, fp16); signed zeros included
        assert torch.equal(_bits(got), _bits(ref.to(dtype))), dtype
    assert ggml.DECODER_CALLS == {"triton": 3}


def test_linear_decodes_into_the_scratch_buffer(triton_decoder):
    t = GGML_TYPES["Q6_K"]
    raw = _blocks("Q6_K", 24, seed=7)
    raw[:, 208:210] = np.array([1e-3], dtype=np.float16).view(np.uint8)  # sane scales
    lin = GGUFLinear(512, 12, "Q6_K")
    lin.weight.data = torch.from_numpy(raw.reshape(12, t.row_bytes(512)))
    x = torch.randn(5, 512)
    release_scratch()
    y = lin(x)
    buf = scratch((12, 512), torch.float32, x.device)
    ref = torch.from_numpy(gguf.quants.dequantize(lin.weight.numpy(), gguf.GGMLQuantizationType.Q6_K))
    assert torch.equal(buf, ref)  # the weight was written into the shared buffer
    ptr = buf.data_ptr()
    assert torch.equal(lin(x), y) and scratch((12, 512), torch.float32, x.device).data_ptr() == ptr
    assert ggml.DECODER_CALLS == {"triton": 2}
    release_scratch()


def test_tiny_gguf_transformer_same_through_triton_and_torch(tmp_path, monkeypatch, triton_decoder):
    dtype = torch.bfloat16  # the activation dtype of real runs (float32 output: the kernel tests)
    # every type in turn, one block of each kind (the interpreter is slow)
    path = write_tiny_gguf_transformer(tmp_path, "klein-4b", mix="mixed", seed=5, depth=1, depth_single=1)
    model = load_transformer(path, dtype=dtype)
    stored = {m.storage for m in model.modules() if isinstance(m, QuantLinear)}
    assert stored >= set(F16_FIELDS)
    cfg = tiny_config("klein-4b", 1, 1)
    g = torch.Generator().manual_seed(0)
    x = dict(
        img=torch.randn(1, 16, 128, generator=g).to(dtype),
        img_ids=torch.stack([torch.zeros(16), torch.arange(16) // 4, torch.arange(16) % 4, torch.zeros(16)], -1)[None],
        txt=torch.randn(1, 5, cfg.context_dim, generator=g).to(dtype),
        txt_ids=torch.zeros(1, 5, 4),
        timesteps=torch.tensor([0.6]),
    )  # fmt: skip
    ggml.DECODER_CALLS.clear()  # loading decoded the quantized tensors that are no Linear weight
    with torch.no_grad():
        fast = model(**x)
        n_triton = ggml.DECODER_CALLS.get("triton", 0)
        monkeypatch.setenv("FLUX2LOCAL_GGUF_DECODER", "torch")
        ref = model(**x)
    quantized = [m for m in model.modules() if isinstance(m, QuantLinear)]
    assert n_triton == sum(m.storage in F16_FIELDS for m in quantized) > 0  # IQ4_* stay on torch
    assert torch.equal(fast, ref)


def test_decoder_choice(monkeypatch):
    q4 = GGML_TYPES["Q4_K"]
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    monkeypatch.delenv("FLUX2LOCAL_GGUF_DECODER", raising=False)
    monkeypatch.delenv("FLUX2LOCAL_COMPILE_DEQUANT", raising=False)
    monkeypatch.delenv("FLUX2LOCAL_FAST", raising=False)
    monkeypatch.setattr(ggml, "_TRITON_FAILED", [])
    assert ggml.decoder_for(q4, cuda, torch.bfloat16) == "triton"  # the default on CUDA
    assert ggml.decoder_for(GGML_TYPES["IQ4_XS"], cuda, torch.bfloat16) == "torch"  # no kernel
    assert ggml.decoder_for(q4, cpu, torch.bfloat16) == "torch"  # auto never interprets
    monkeypatch.setenv("FLUX2LOCAL_FAST", "0")  # eager blocks keep the (bit-exact) kernels
    assert ggml.decoder_for(q4, cuda, torch.bfloat16) == "triton"
    monkeypatch.setenv("FLUX2LOCAL_GGUF_DECODER", "torch")
    assert ggml.decoder_for(q4, cuda, torch.bfloat16) == "torch"
    monkeypatch.setenv("FLUX2LOCAL_GGUF_DECODER", "triton")
    assert ggml.decoder_for(q4, cuda, torch.bfloat16) == "triton"  # explicit wins
    assert ggml.decoder_for(q4, cpu, torch.bfloat16) == "triton"  # TRITON_INTERPRET=1 here
    monkeypatch.setenv("FLUX2LOCAL_GGUF_DECODER", "compile")
    assert ggml.decoder_for(q4, cuda, torch.bfloat16) == "compile"
    monkeypatch.setenv("FLUX2LOCAL_GGUF_DECODER", "fast")
    with pytest.raises(ValueError, match="FLUX2LOCAL_GGUF_DECODER"):
        ggml.decoder_for(q4, cuda, torch.bfloat16)
    monkeypatch.setenv("FLUX2LOCAL_GGUF_DECODER", "auto")
    monkeypatch.setattr(ggml, "_TRITON_FAILED", ["an earlier failure"])
    assert ggml.decoder_for(q4, cuda, torch.bfloat16) == "torch"


def test_a_failing_kernel_falls_back_once(kernels, triton_decoder, monkeypatch, caplog):
    def broken(*args):
        raise RuntimeError("no kernel image for this GPU")

    monkeypatch.setattr(kernels, "decode_into", broken)
    t = GGML_TYPES["Q8_0"]
    raw = torch.from_numpy(_blocks("Q8_0", 8, seed=3).reshape(4, -1))
    ref = gguf.quants.dequantize(raw.numpy(), gguf.GGMLQuantizationType.Q8_0)
    with caplog.at_level(logging.WARNING, logger=ggml.__name__):
        for _ in range(3):
            np.testing.assert_array_equal(dequantize_ggml(raw, t, (4, 64)).numpy(), ref)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "no kernel image" in warnings[0].getMessage()
    assert ggml.DECODER_CALLS == {"torch": 3}


def test_compiled_code_calls_the_kernel_as_one_op(triton_decoder):
    t = GGML_TYPES["Q5_K"]
    raw = _blocks("Q5_K", 8, seed=9)
    raw[:, :4] = np.array([1e-3, 5e-4], dtype=np.float16).view(np.uint8)
    lin = GGUFLinear(512, 4, "Q5_K")
    lin.weight.data = torch.from_numpy(raw.reshape(4, t.row_bytes(512)))
    x = torch.randn(3, 512)
    targets = []

    def recording_backend(gm, example_inputs):  # the graph dynamo hands to the compiler
        targets.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return gm.forward

    torch._dynamo.reset()
    compiled = torch.compile(lin, backend=recording_backend, fullgraph=True)
    with torch.no_grad():
        y = compiled(x)
    torch._dynamo.reset()
    w = torch.from_numpy(gguf.quants.dequantize(raw.reshape(4, -1), gguf.GGMLQuantizationType.Q5_K))
    assert torch.equal(y, torch.nn.functional.linear(x, w))
    assert any("flux2local.ggml_decode_" in t for t in targets), targets  # the kernel, as one op
    assert not any("and" in t or "shift" in t for t in targets), targets  # no torch decoder traced
