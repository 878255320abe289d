"""The CUDA path of LoRAs (run on the lent GPU): factors moved to the GPU on first use and dropped
on request; a LoRA beside streamed blocks (side-stream copies, ring slots) equals resident."""

from __future__ import annotations

import pytest
import torch

from flux2_core import apply_loras, load_lora, load_transformer
from flux2_core.lora import release_device_copies
from weight_streaming import StreamingConfig, WeightStreamer

from .conftest import make_inputs, merged_reference, rel_err

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def _cuda(x: dict) -> dict:
    return {k: None if v is None else v.cuda() for k, v in x.items()}


def test_factors_follow_the_model_to_the_gpu_and_back(tiny_models, lora_file):
    path = tiny_models("dev", "bfl", torch.bfloat16)
    model = load_transformer(path, dtype=torch.bfloat16)
    file, deltas = lora_file(model.config, "peft", seed=3)
    apply_loras(model, [(load_lora(file), 0.9)])
    x = make_inputs(model.config)
    want = merged_reference(path, [(deltas, 0.9)])(**x)
    model.cuda()
    with torch.no_grad():
        got = model(**_cuda(x))
    assert rel_err(got.cpu(), want) < 2e-2
    (patch,) = model.double_blocks[0].img_attn.qkv._forward_hooks.values()
    assert patch.on_device.down.device.type == "cuda"
    release_device_copies(model)
    assert patch.on_device is None


def test_lora_beside_cuda_streamed_blocks_equals_resident(tiny_models, lora_file):
    path = tiny_models("dev", "bfl", torch.bfloat16)
    config = load_transformer(path).config
    lora = load_lora(lora_file(config, "lokr", seed=4)[0])
    x = _cuda(make_inputs(config))
    resident = load_transformer(path, dtype=torch.bfloat16).cuda()
    apply_loras(resident, [(lora, 1.0)])
    model = load_transformer(path, dtype=torch.bfloat16)
    apply_loras(model, [(lora, 1.0)])
    with torch.no_grad():
        want = resident(**x)
        with WeightStreamer(model, StreamingConfig(vram_budget=0), "cuda") as ws:
            assert ws.plan.streamed_indices
            for _ in range(3):
                assert torch.equal(model(**x), want)
