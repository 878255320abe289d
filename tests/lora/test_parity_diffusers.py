"""The same LoRA files through diffusers' own loader (``Flux2LoraLoaderMixin.lora_state_dict`` ->
``load_lora_adapter`` -> ``set_adapters`` on ``Flux2Transformer2DModel``, PEFT layers) and through ours,
on the same random weights, in fp32.

Where diffusers' converters leave layers out or differ, the case says so and keeps to what they map:
its kohya converter skips the modulation and guidance layers; its ai-toolkit converter reads no
``.alpha`` and maps ``final_layer.adaLN_modulation.1`` onto ``norm_out.linear`` without swapping the
(shift, scale) halves (ComfyUI, which keeps the BFL name, agrees with us: tests/comfyui); peft's LoKr
cannot hold a decomposed w1 beside a full w2.
"""

from __future__ import annotations

import logging

import peft  # noqa: F401
import pytest
import torch
from diffusers import Flux2Transformer2DModel  # noqa: E402
from diffusers.loaders.lora_pipeline import Flux2LoraLoaderMixin  # noqa: E402
from diffusers.loaders.single_file_utils import convert_flux2_transformer_checkpoint_to_diffusers  # noqa: E402
from safetensors.torch import load_file

from flux2_core import apply_loras, load_lora, load_transformer
from flux2_core.tiny.lora import lora_targets

from .conftest import make_inputs, rel_err


def _diffusers_model(path, c):
    ref = Flux2Transformer2DModel(
        num_layers=c.depth,
        num_single_layers=c.depth_single,
        num_attention_heads=c.num_heads,
        joint_attention_dim=c.context_dim,
        guidance_embeds=c.guidance_embed,
    )
    ref.load_state_dict(convert_flux2_transformer_checkpoint_to_diffusers(load_file(str(path))), strict=True)
    return ref.eval()


def _run(ref, x):
    return ref(
        hidden_states=x["img"],
        encoder_hidden_states=x["txt"],
        timestep=x["timesteps"],
        img_ids=x["img_ids"][0],
        txt_ids=x["txt_ids"][0],
        guidance=x["guidance"],
        return_dict=False,
    )[0]


def _load_into_diffusers(ref, files_and_strengths):
    names = []
    for i, (file, _) in enumerate(files_and_strengths):
        state_dict, metadata = Flux2LoraLoaderMixin.lora_state_dict(str(file), return_lora_metadata=True)
        ref.load_lora_adapter(state_dict, prefix="transformer", adapter_name=f"a{i}", metadata=metadata)
        names.append(f"a{i}")
    ref.set_adapters(names, weights=[s for _, s in files_and_strengths])


def _not_modulation(c):
    return [t for t in lora_targets(c) if "modulation" not in t and not t.startswith("guidance_in")]


def _no_final_norm(c):
    return [t for t in lora_targets(c) if t != "final_layer.adaLN_modulation.1"]


# (format, targets(config), writer options of LoRA 1, of LoRA 2)
CASES = {
    # every layer, alpha and per-module rank/alpha patterns in the metadata; LoRA 2 without alpha
    "peft": ("peft", lora_targets, {"alpha": 6.0}, {"alpha": None, "rank": 3}),
    # fp32 files: diffusers folds alpha / rank into the factors in the file's dtype (bf16 would round)
    "kohya": ("kohya", _not_modulation, {"alpha": 3.0, "dtype": torch.float32}, {"alpha": None, "rank": 2}),
    "ai-toolkit": ("ai-toolkit", _no_final_norm, {"alpha": None}, {"alpha": None, "rank": 5}),
    "lokr-bfl": ("lokr-bfl", _no_final_norm, {"alpha": 2.0, "lokr_layouts": (0, 1)}, None),
    "lokr": ("lokr", lambda c: lora_targets(c, "blocks"), {"alpha": 2.0, "lokr_layouts": (0, 1)}, None),
}


@pytest.mark.parametrize("case", list(CASES))
def test_same_output_as_diffusers(tiny_models, lora_file, caplog, case):
    caplog.set_level(logging.ERROR)  # diffusers warns about the layers its converters skip
    fmt, targets, first, second = CASES[case]
    path = tiny_models("dev")
    model = load_transformer(path, dtype=torch.float32)
    c = model.config
    ref = _diffusers_model(path, c)
    x = make_inputs(c)
    files = [(lora_file(c, fmt, name="a.safetensors", seed=21, targets=targets(c), **first)[0], 0.7)]
    if second is not None:
        files.append(
            (lora_file(c, fmt, name="b.safetensors", seed=22, targets=targets(c), **second)[0], -0.4)
        )
    _load_into_diffusers(ref, files)
    apply_loras(model, [(load_lora(f), s) for f, s in files])
    with torch.no_grad():
        ours, theirs = model(**x), _run(ref, x)
        ref.disable_adapters()
        base = _run(ref, x)
    assert rel_err(theirs, base) > 0.05
    assert rel_err(ours, theirs) < 1e-5, f"{case}: {rel_err(ours, theirs):.2e}"
