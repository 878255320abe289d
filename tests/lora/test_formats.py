"""Every LoRA format on the fly equals the merged reference W + strength x alpha/rank x B @ A (fp32);
stacking, strength 0, strength changes, removal, and the optional merge."""

from __future__ import annotations

import pytest
import torch

from flux2_core import apply_loras, load_lora, load_transformer
from flux2_core.lora import applied_loras
from flux2_core.tiny.lora import FORMATS, lora_targets

from .conftest import make_inputs, merged_reference, rel_err

LABELS = {
    "ai-toolkit": "ai-toolkit / BFL",
    "kohya": "kohya / musubi",
    "peft": "diffusers / PEFT",
    "peft-base-model": "diffusers / PEFT",
    "onetrainer": "OneTrainer",
    "diffsynth": "bare module names (DiffSynth)",
    "lokr": "LyCORIS LoKr",
    "lokr-bfl": "ai-toolkit / BFL LoKr",
    "loha": "LyCORIS LoHa",
}


# Every format on [dev] (every layer kind, guidance embedder included); three on [klein] 4B.
CASES = [("dev", f) for f in FORMATS] + [("klein-4b", f) for f in ("kohya", "peft", "lokr-bfl")]


@pytest.mark.parametrize(("variant", "fmt"), CASES, ids=[f"{v}-{f}" for v, f in CASES])
def test_on_the_fly_equals_merged_reference(tiny_models, lora_file, variant, fmt):
    path = tiny_models(variant)
    model = load_transformer(path, dtype=torch.float32)
    x = make_inputs(model.config)
    with torch.no_grad():
        base = model(**x)
    file, deltas = lora_file(model.config, fmt, seed=11)
    lora = load_lora(file)
    assert lora.format == LABELS[fmt]
    assert set(lora.layers) == set(lora_targets(model.config)) == set(deltas)  # every linear, embedders too
    assert lora.hidden_size == model.config.hidden_size and not lora.unmatched
    apply_loras(model, [(lora, 0.8)])
    ref = merged_reference(path, [(deltas, 0.8)])
    with torch.no_grad():
        got, want = model(**x), ref(**x)
    assert rel_err(want, base) > 0.05  # the LoRA changes the output clearly
    assert rel_err(got, want) < 1e-5, f"{fmt}: {rel_err(got, want):.2e}"
    apply_loras(model, [])
    with torch.no_grad():
        assert torch.equal(model(**x), base)  # removal restores the base bit for bit
    assert not model._forward_hooks and all(not m._forward_hooks for m in model.modules())


def test_two_loras_stacked_strength_change_and_zero(tiny_models, lora_file):
    path = tiny_models("dev")
    model = load_transformer(path, dtype=torch.float32)
    x = make_inputs(model.config)
    a_file, a = lora_file(model.config, "kohya", name="a.safetensors", seed=1, alpha=3.0)
    b_file, b = lora_file(model.config, "peft", name="b.safetensors", seed=2, rank=3)
    la, lb = load_lora(a_file), load_lora(b_file)
    with torch.no_grad():
        base = model(**x)
        for sa, sb in [(0.7, -0.4), (1.3, 0.5)]:  # a strength change: same objects, nothing reloaded
            apply_loras(model, [(la, sa), (lb, sb)])
            want = merged_reference(path, [(a, sa), (b, sb)])(**x)
            assert rel_err(model(**x), want) < 1e-5
        assert applied_loras(model) == ((la, 1.3), (lb, 0.5))
        apply_loras(model, [(la, 0.0), (lb, 0.0)])
        assert torch.equal(model(**x), base)  # strength 0 is the base model, bit for bit
        apply_loras(model, [(la, 1.0)])
        assert rel_err(model(**x), merged_reference(path, [(a, 1.0)])(**x)) < 1e-5
        apply_loras(model, [])
        assert torch.equal(model(**x), base)


def test_reapplying_the_same_stack_keeps_the_device_copies(tiny_models, lora_file):
    model = load_transformer(tiny_models("klein-4b"), dtype=torch.float32)
    lora = load_lora(lora_file(model.config, "ai-toolkit")[0])
    x = make_inputs(model.config)
    apply_loras(model, [(lora, 1.0)])
    with torch.no_grad():
        model(**x)
    layer = model.double_blocks[0].img_attn.qkv
    (patch,) = layer._forward_hooks.values()
    prepared = patch.on_device
    assert prepared is not None and prepared.down.device.type == "cpu"
    apply_loras(model, [(lora, 1.0)])  # same stack: a no-op
    assert next(iter(layer._forward_hooks.values())).on_device is prepared
    apply_loras(model, [(lora, 0.5)])  # another strength: new factors on next use, same module
    assert next(iter(layer._forward_hooks.values())) is not patch


def test_factors_are_not_parameters_or_buffers(tiny_models, lora_file):
    model = load_transformer(tiny_models("dev"), dtype=torch.float32)
    before = ({n: p.data_ptr() for n, p in model.named_parameters()}, dict(model.named_buffers()))
    apply_loras(model, [(load_lora(lora_file(model.config, "peft")[0]), 1.0)])
    with torch.no_grad():
        model(**make_inputs(model.config))
    after = ({n: p.data_ptr() for n, p in model.named_parameters()}, dict(model.named_buffers()))
    assert before[0] == after[0] and before[1].keys() == after[1].keys()
    assert set(model.state_dict()) == set(before[0]) | set(before[1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merge_agrees_with_on_the_fly_and_unmerges_bit_for_bit(tiny_models, lora_file, dtype):
    path = tiny_models("dev")
    model = load_transformer(path, dtype=dtype)
    x = make_inputs(model.config)
    lora = load_lora(lora_file(model.config, "lokr", seed=4)[0])
    other = load_lora(lora_file(model.config, "ai-toolkit", name="b.safetensors", seed=5)[0])
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        base = model(**x)
        apply_loras(model, [(lora, 0.9), (other, 0.6)])
        fly = model(**x)
        apply_loras(model, [(lora, 0.9), (other, 0.6)], merge=True)
        assert not any(m._forward_hooks for m in model.modules())  # nothing left per step
        merged = model(**x)
        apply_loras(model, [])
        assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())
        assert torch.equal(model(**x), base)
    # fp32: the two orders of summation; bf16: the merged weights are rounded to bf16 once.
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert rel_err(merged, fly) < tol, f"{rel_err(merged, fly):.2e}"
    assert rel_err(fly, base) > 0.05


def test_hooks_work_beside_any_layer_class(tiny_models, lora_file):
    """A layer that is not nn.Linear (int8 weights with a scale, like a quantized layer) gets the same
    update: only in_features, out_features and forward are used."""

    class Int8Linear(torch.nn.Module):
        def __init__(self, w: torch.Tensor):
            super().__init__()
            self.in_features, self.out_features = w.shape[1], w.shape[0]
            self.scale = w.abs().amax() / 127
            self.register_buffer("q", torch.round(w / self.scale).to(torch.int8))

        def dequantized(self, dtype):
            return (self.q.float() * self.scale).to(dtype)

        def forward(self, x):
            return x @ self.dequantized(x.dtype).t()

    path = tiny_models("klein-4b")
    model = load_transformer(path, dtype=torch.float32)
    block = model.single_blocks[1]
    block.linear1 = Int8Linear(block.linear1.weight.data)
    file, deltas = lora_file(model.config, "kohya", targets=["single_blocks.1.linear1"])
    ref = load_transformer(path, dtype=torch.float32)
    ref.single_blocks[1].linear1.weight.data = (
        block.linear1.dequantized(torch.float32) + deltas["single_blocks.1.linear1"]
    )
    apply_loras(model, [(load_lora(file), 1.0)], merge=True)  # not mergeable: hooked instead
    x = make_inputs(model.config)
    with torch.no_grad():
        assert rel_err(model(**x), ref(**x)) < 1e-5
