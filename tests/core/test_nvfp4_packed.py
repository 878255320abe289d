"""NVFP4 checkpoints stay packed: about 4.5 bits a weight in memory, output equal to the dequantized model."""

import pytest
import torch

from flux2_core import load_transformer
from flux2_core.quant import NVFP4Linear

from .conftest import make_inputs


def _param_bytes(model, predicate=lambda n: True):
    return sum(p.numel() * p.element_size() for n, p in model.named_parameters() if predicate(n))


def test_nvfp4_layers_stay_packed_in_memory(tiny_files):
    path = tiny_files("dev", "nvfp4")
    packed = load_transformer(path, dtype=torch.bfloat16)
    dense = load_transformer(path, dtype=torch.bfloat16, keep_quantized=False)
    layers = {n: m for n, m in packed.named_modules() if isinstance(m, NVFP4Linear)}
    assert len(layers) == 2 * 2 * 4 + 2 * 2  # every block linear of the tiny [dev]
    weights = sum(m.in_features * m.out_features for m in layers.values())
    stored = sum(m.stored_bytes() for m in layers.values())
    assert 8 * stored / weights == pytest.approx(4.5, abs=0.01)  # measured bytes held by the model
    in_blocks = lambda n: "_blocks." in n  # noqa: E731
    assert _param_bytes(packed, in_blocks) / _param_bytes(dense, in_blocks) < 0.3
    # the packed codes are the file's bytes (memory-mapped views, no unpacked copy)
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        key = "double_blocks.0.img_attn.qkv.weight"
        assert torch.equal(packed.get_parameter(key), f.get_tensor(key))


def test_nvfp4_output_equals_the_dequantized_reference(tiny_files):
    path = tiny_files("klein-4b", "nvfp4")
    packed = load_transformer(path, dtype=torch.float32)
    dense = load_transformer(path, dtype=torch.float32, keep_quantized=False)
    x = make_inputs(packed.config)
    with torch.no_grad():
        assert torch.equal(packed(**x), dense(**x))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_nvfp4_vram_is_the_packed_bytes(tiny_files):
    path = tiny_files("dev", "nvfp4")
    model = load_transformer(path, dtype=torch.bfloat16)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    model.to("cuda")
    torch.cuda.synchronize()
    used = torch.cuda.memory_allocated() - before
    expected = _param_bytes(model)
    assert expected <= used <= expected + 512 * len(list(model.parameters()))
