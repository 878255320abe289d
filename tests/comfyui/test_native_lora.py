"""ComfyUI's LoraLoaderModelOnly on our native MODEL equals FLUX.2 LoRA Loader on our model.

ComfyUI maps each file's keys onto the model's state dict and adds LoRA / LoHa / LoKr patches (with
q/k/v row offsets and the swapped norm_out for diffusers names); our patcher turns those patches into
updates beside the layers. The files are the ones test_lora_native.py proves ComfyUI and our loader
read alike on ComfyUI's own FLUX.2; here both run on our transformer.
"""

from __future__ import annotations

import pytest
import torch
from comfy_server import history_error
from native_graph import Graph, read_latent
from test_lora_native import LORAS, _targets

MODEL, TE = "flux2-dev.safetensors", "mistral_3_small_flux2_bf16.safetensors"
SIZE, STEPS, SEED, STRENGTH = (64, 64), 2, 9, 0.8
FORMATS = ("ai-toolkit", "peft", "loha", "lokr")


@pytest.fixture(scope="module")
def native_lora_files(comfy) -> dict[str, str]:
    from flux2_core import load_transformer
    from flux2_core.tiny.lora import write_tiny_lora

    config = load_transformer(comfy.base / "models" / "diffusion_models" / MODEL).config
    out = {}
    for i, name in enumerate(FORMATS):
        fmt, kind, opts = LORAS[name]
        file = f"native_{name}.safetensors"
        write_tiny_lora(
            comfy.base / "models" / "loras" / file,
            config,
            fmt,
            seed=70 + i,
            targets=_targets(config, kind),
            **opts,
        )
        out[name] = file
    return out


def test_native_lora_loader_on_our_model_equals_our_lora_node(comfy, native_lora_files):
    g = Graph("nlora")
    enc = g.encode(TE, "a lighthouse at dusk")
    ours = g.model(MODEL)
    native = g.add("Flux2LocalToNativeModel", model=ours)

    def native_sample(model) -> list:
        return g.custom_advanced(
            g.add("BasicGuider", model=model, conditioning=Graph.out(enc, 2)), SIZE, SEED, STEPS
        )

    def our_lora(model, name) -> list:
        return g.add(
            "Flux2LocalLoRALoader", model=model, lora_name=native_lora_files[name], strength=STRENGTH
        )

    def native_lora(model, name) -> list:
        return g.add(
            "LoraLoaderModelOnly", model=model, lora_name=native_lora_files[name], strength_model=STRENGTH
        )

    g.save("base_ours", g.sampler(ours, enc, SIZE, SEED, STEPS, 4.0))
    g.save("base_native", native_sample(native))
    for name in FORMATS:
        g.save(f"ours_{name}", g.sampler(our_lora(ours, name), enc, SIZE, SEED, STEPS, 4.0))
        g.save(f"native_{name}", native_sample(native_lora(native, name)))
    # a stack across both: our LoRA node, then the conversion, then a native loader on top
    stacked = native_lora(g.add("Flux2LocalToNativeModel", model=our_lora(ours, "ai-toolkit")), "lokr")
    g.save("mixed", native_sample(stacked))
    g.save(
        "ours_stack", g.sampler(our_lora(our_lora(ours, "ai-toolkit"), "lokr"), enc, SIZE, SEED, STEPS, 4.0)
    )
    entry = comfy.run(g.nodes, timeout=600)
    assert history_error(entry) is None, history_error(entry)

    def lat(name):
        return read_latent(comfy, g.tag, name)

    base = lat("base_ours")
    assert base.std() > 0.1
    torch.testing.assert_close(lat("base_native"), base, rtol=1e-3, atol=1e-3)
    for name in [*FORMATS, "stack"]:
        ours_l = lat(f"ours_{name}")
        native_l = lat("mixed" if name == "stack" else f"native_{name}")
        assert (ours_l - base).abs().max() > 0.05, f"{name}: the LoRA changed nothing"
        torch.testing.assert_close(native_l, ours_l, rtol=1e-3, atol=1e-3, msg=lambda m, n=name: f"{n}: {m}")
