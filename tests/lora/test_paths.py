"""The same LoRA on every weight path: resident, streamed (the weight streamer on the CPU), FP8 block
linears kept in FP8 (keep_fp8), GGUF weights kept in their stored blocks. Each path with the LoRA equals its own file's weights dequantized,
merged with the LoRA in fp32, within bf16 tolerance; streaming also equals resident exactly.

A new weight path is one entry in PATHS: the tiny file layout and the loader's options.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, field

import pytest
import torch

from flux2_core import apply_loras, load_lora, load_transformer
from flux2_core.quant import FP8Linear, GGUFLinear
from weight_streaming import StreamingConfig, WeightStreamer

from .conftest import make_inputs, merged_reference, rel_err

BF16_TOL = 2e-2  # bf16 activations and weights through a 4-block model


@dataclass(frozen=True)
class Path:
    layout: str  # tiny transformer layout (flux2_core.tiny.transformer.LAYOUTS)
    load: dict = field(default_factory=dict)  # load_transformer options
    streamed: bool = False


PATHS = {
    "resident": Path("bfl"),
    "streamed": Path("bfl", streamed=True),
    "fp8": Path("bfl-fp8", {"keep_fp8": True}),
    "fp8-streamed": Path("bfl-fp8", {"keep_fp8": True}, streamed=True),
    "gguf": Path("gguf"),
    "gguf-streamed": Path("gguf", streamed=True),
}


def _streamer(model, on: bool):
    # Budget 0: every block is paged through the ring, the hardest case for hooks beside the layers.
    return WeightStreamer(model, StreamingConfig(vram_budget=0), "cpu") if on else nullcontext()


# Every path once; the formats differ in how they are applied (fused qkv slices, Kronecker products).
CASES = [
    ("resident", "peft"),
    ("streamed", "peft"),
    ("fp8", "ai-toolkit"),
    ("fp8-streamed", "lokr"),
    ("gguf", "kohya"),
    ("gguf-streamed", "loha"),
]


@pytest.mark.parametrize(("name", "fmt"), CASES, ids=[f"{n}-{f}" for n, f in CASES])
def test_lora_on_every_weight_path(tiny_models, lora_file, name, fmt):
    p = PATHS[name]
    file = tiny_models("dev", p.layout, torch.bfloat16)
    model = load_transformer(file, dtype=torch.bfloat16, **p.load)
    if p.load.get("keep_fp8"):
        assert isinstance(model.double_blocks[0].img_attn.qkv, FP8Linear)
    if p.layout == "gguf":
        assert isinstance(model.double_blocks[0].img_attn.qkv, GGUFLinear)
    lora_path, deltas = lora_file(model.config, fmt, seed=7)
    x = make_inputs(model.config)
    want = merged_reference(file, [(deltas, 0.8)])(**x)  # fp32, the file's weights dequantized
    apply_loras(model, [(load_lora(lora_path), 0.8)])
    with torch.no_grad(), _streamer(model, p.streamed):
        got = model(**x)
        got_again = model(**x)
    assert torch.equal(got, got_again)
    assert rel_err(got, want) < BF16_TOL, f"{name}/{fmt}: {rel_err(got, want):.2e}"
    if p.streamed:  # streaming moves bytes, never changes them
        resident = load_transformer(file, dtype=torch.bfloat16, **p.load)
        apply_loras(resident, [(load_lora(lora_path), 0.8)])
        with torch.no_grad():
            assert torch.equal(got, resident(**x))


def _host_bytes(ws: WeightStreamer) -> list[tuple[int, int]]:
    """Which host object holds each streamed block and where its tensors live (pinned or in place)."""
    return [(id(h), v.data_ptr()) for h in ws.host_buffers for v in h.views]


def test_strength_change_and_swap_while_streamed_repin_nothing(tiny_models, lora_file):
    file = tiny_models("klein-4b", "bfl", torch.float32)
    model = load_transformer(file, dtype=torch.float32)
    a_path, a = lora_file(model.config, "kohya", name="a.safetensors", seed=1)
    b_path, b = lora_file(model.config, "lokr", name="b.safetensors", seed=2)
    la, lb = load_lora(a_path), load_lora(b_path)
    x = make_inputs(model.config)
    with torch.no_grad(), WeightStreamer(model, StreamingConfig(vram_budget=0), "cpu") as ws:
        plan, host = ws.plan, _host_bytes(ws)
        base = model(**x)
        for stack, ref in [
            ([(la, 1.0)], [(a, 1.0)]),
            ([(la, -0.5)], [(a, -0.5)]),
            ([(lb, 0.7), (la, 0.2)], [(b, 0.7), (a, 0.2)]),
        ]:
            apply_loras(model, stack)
            assert rel_err(model(**x), merged_reference(file, ref)(**x)) < 1e-5
            assert ws.plan is plan and _host_bytes(ws) == host
        apply_loras(model, [])
        assert torch.equal(model(**x), base)
