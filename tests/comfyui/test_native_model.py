"""Our transformer as ComfyUI's MODEL (FLUX.2 To Native MODEL) and our Sampler on native inputs.

The same tiny checkpoint runs through (a) our Model Loader -> FLUX.2 Sampler, (b) FLUX.2 To Native MODEL
-> ComfyUI's SamplerCustomAdvanced / KSampler and (c) ComfyUI's UNETLoader -> the same native
samplers; all latents must agree. Conditioning is FLUX.2 Encode Prompt's native CONDITIONING output,
so no test-only bridge is involved.
"""

from __future__ import annotations

import asyncio
import re
import time

import pytest
import torch
from comfy_server import history_error
from native_graph import Graph, read_latent
from test_interrupt_and_errors import _wait_for_log
from test_progress import _run_and_listen

SIZE, STEPS, SEED = (64, 64), 3, 21
TOL = dict(rtol=1e-3, atol=1e-3)

CASES = {
    # model file, text encoder, guidance, CFG
    "dev": ("flux2-dev.safetensors", "mistral_3_small_flux2_bf16.safetensors", 4.0, False),
    "klein-base": ("flux-2-klein-base-4b.safetensors", "qwen_3_4b.safetensors", 3.5, True),
}


def _pair(g: Graph, enc, cfg: bool, guidance: float, model) -> list:
    pos, neg = Graph.out(enc, 2), Graph.out(enc, 3)
    if cfg:
        return g.add("CFGGuider", model=model, positive=pos, negative=neg, cfg=guidance)
    return g.add("BasicGuider", model=model, conditioning=pos)


def _run(comfy, g: Graph):
    entry = comfy.run(g.nodes, timeout=600)
    assert history_error(entry) is None, history_error(entry)
    return lambda name: read_latent(comfy, g.tag, name)


def test_native_samplers_on_our_model_equal_our_sampler_and_native_flux2(comfy):
    """[dev] (embedded guidance): every sampler path, both schedules, the second-order solvers."""
    model_file, te, guidance, cfg = CASES["dev"]
    g = Graph("nat_dev")
    enc = g.encode(te, "a small red cube on a table")
    ours = g.model(model_file)
    native = g.add("Flux2LocalToNativeModel", model=ours)
    unet = g.add("UNETLoader", unet_name=model_file, weight_dtype="default")
    # euler, FLUX.2 schedule
    g.save("ours", g.sampler(ours, enc, SIZE, SEED, STEPS, guidance))
    g.save("ours_on_native", g.sampler(native, enc, SIZE, SEED, STEPS, guidance))
    g.save("ours_on_unet", g.sampler(unet, enc, SIZE, SEED, STEPS, guidance))
    g.save("sca_native", g.custom_advanced(_pair(g, enc, cfg, guidance, native), SIZE, SEED, STEPS))
    g.save("sca_unet", g.custom_advanced(_pair(g, enc, cfg, guidance, unet), SIZE, SEED, STEPS))
    # KSampler with its "simple" schedule; [dev] has embedded guidance (4 on the CONDITIONING): CFG 1
    pos, neg = Graph.out(enc, 2), Graph.out(enc, 3)
    g.save("ks_native", g.ksampler(native, pos, neg, SIZE, SEED, STEPS, 1.0))
    g.save("ks_unet", g.ksampler(unet, pos, neg, SIZE, SEED, STEPS, 1.0))
    g.save("ours_simple", g.sampler(ours, enc, SIZE, SEED, STEPS, guidance, scheduler="simple"))
    # the second-order solvers against ComfyUI's of the same name on the FLUX.2 schedule
    for name in ("dpmpp_2m", "res_multistep"):
        g.save(f"ours_{name}", g.sampler(ours, enc, SIZE, SEED, STEPS, guidance, sampler_name=name))
        g.save(
            f"sca_unet_{name}", g.custom_advanced(_pair(g, enc, cfg, guidance, unet), SIZE, SEED, STEPS, name)
        )
    lat = _run(comfy, g)
    ref = lat("ours")
    assert ref.shape == (1, 128, SIZE[1] // 16, SIZE[0] // 16) and ref.std() > 0.1
    for name in ("ours_on_native", "ours_on_unet", "sca_native", "sca_unet"):
        torch.testing.assert_close(lat(name), ref, **TOL, msg=lambda m, n=name: f"{n}: {m}")
    simple = lat("ours_simple")
    assert (simple - ref).abs().max() > 1e-2  # another schedule, another result
    for name in ("ks_native", "ks_unet"):
        torch.testing.assert_close(lat(name), simple, **TOL, msg=lambda m, n=name: f"{n}: {m}")
    for name in ("dpmpp_2m", "res_multistep"):
        torch.testing.assert_close(lat(f"ours_{name}"), lat(f"sca_unet_{name}"), **TOL)
        assert (lat(f"ours_{name}") - ref).abs().max() > 1e-3


def test_cfg_on_our_native_model_equals_our_sampler(comfy):
    """Base [klein] with true CFG: CFGGuider and KSampler on our MODEL, our Sampler on it."""
    model_file, te, guidance, cfg = CASES["klein-base"]
    g = Graph("nat_base")
    enc = g.encode(te, "a ceramic teapot", negative="blurry")
    ours = g.model(model_file)
    native = g.add("Flux2LocalToNativeModel", model=ours)
    g.save("ours", g.sampler(ours, enc, SIZE, SEED, STEPS, guidance))
    g.save("ours_on_native", g.sampler(native, enc, SIZE, SEED, STEPS, guidance))
    g.save("sca_native", g.custom_advanced(_pair(g, enc, cfg, guidance, native), SIZE, SEED, STEPS))
    g.save("ours_simple", g.sampler(ours, enc, SIZE, SEED, STEPS, guidance, scheduler="simple"))
    pos, neg = Graph.out(enc, 2), Graph.out(enc, 3)
    g.save("ks_native", g.ksampler(native, pos, neg, SIZE, SEED, STEPS, guidance))
    lat = _run(comfy, g)
    ref = lat("ours")
    assert ref.std() > 0.1
    for name in ("ours_on_native", "sca_native"):
        torch.testing.assert_close(lat(name), ref, **TOL, msg=lambda m, n=name: f"{n}: {m}")
    torch.testing.assert_close(lat("ks_native"), lat("ours_simple"), **TOL)


def _easycache_report(comfy, start: int) -> tuple[int, int]:
    text = comfy.log_path.read_text(errors="replace")[start:]
    found = re.findall(r"EasyCache - skipped (\d+)/(\d+) steps", text)
    assert found, f"no EasyCache report in the log:\n{comfy.log_tail(40)}"
    skipped, total = found[-1]
    return int(skipped), int(total)


@pytest.mark.parametrize("source", ["ours", "unet"])
def test_easycache_skips_steps_on_our_model(comfy, source):
    model_file = "flux-2-klein-4b.safetensors"
    g = Graph(f"easycache_{source}")
    enc = g.encode("qwen_3_4b.safetensors", "a lighthouse at dusk")
    if source == "ours":
        model = g.add("Flux2LocalToNativeModel", model=g.model(model_file))
    else:  # the same settings on ComfyUI's own FLUX.2: the anchor that these settings skip steps at all
        model = g.add("UNETLoader", unet_name=model_file, weight_dtype="default")
    cached = g.add(
        "EasyCache", model=model, reuse_threshold=3.0, start_percent=0.1, end_percent=0.95, verbose=False
    )
    steps = 12
    g.save("cached", g.ksampler(cached, Graph.out(enc, 2), Graph.out(enc, 3), SIZE, SEED + 1, steps, 1.0))
    start = len(comfy.log_path.read_text(errors="replace"))
    entry = comfy.run(g.nodes)
    assert history_error(entry) is None, history_error(entry)
    skipped, total = _easycache_report(comfy, start)
    assert total == steps
    assert skipped > 0, "EasyCache ran but skipped no step: its wrapper never saw the diffusion model"


def test_progress_and_previews_of_ksampler_on_our_model(comfy):
    g = Graph("nat_progress")
    enc = g.encode("qwen_3_4b.safetensors", "a lighthouse at dusk")
    native = g.add("Flux2LocalToNativeModel", model=g.model("flux-2-klein-4b.safetensors"))
    ks = g.ksampler(native, Graph.out(enc, 2), Graph.out(enc, 3), (128, 128), 779, 5, 1.0)
    g.save("out", ks)
    messages, previews = asyncio.run(_run_and_listen(comfy, g.nodes))
    assert messages[-1]["type"] == "execution_success", messages[-1]
    progress = [m["data"] for m in messages if m["type"] == "progress" and m["data"].get("node") == ks[0]]
    assert progress and all(p["max"] == 5 for p in progress) and progress[-1]["value"] == 5
    assert previews >= 1, "no latent preview frames were sent during sampling"


def test_cancel_our_sampler_on_a_native_model(comfy):
    g = Graph("nat_cancel")
    enc = g.encode("qwen_3_4b.safetensors", "a lighthouse at dusk")
    native = g.add("Flux2LocalToNativeModel", model=g.model("flux-2-klein-4b.safetensors"))
    g.save("never", g.sampler(native, enc, (512, 512), 4243, 200, 1.0))
    start = len(comfy.log_path.read_text(errors="replace"))
    status, body = comfy.queue_prompt(g.nodes)
    assert status == 200, body
    _wait_for_log(comfy, "Flux2Local: ComfyUI samples 200 steps", start)
    time.sleep(0.3)
    t0 = time.monotonic()
    comfy.interrupt()
    entry = comfy.wait_history(body["prompt_id"], timeout=60)
    stopped_after = time.monotonic() - t0
    interrupted = dict(entry["status"]["messages"]).get("execution_interrupted")
    assert interrupted is not None and interrupted["node_type"] == "Flux2LocalSampler", entry["status"]
    assert stopped_after < 10, f"sampling took {stopped_after:.1f} s to stop after /interrupt"


def test_quantized_weights_under_native_samplers(comfy):
    """FP8 (kept in FP8) and GGUF Q4_K_M layers behind the native MODEL: the same latents as our Sampler
    on the same loaded weights, with a native LoRA loader on the GGUF model equal to our LoRA node."""
    from flux2_core.tiny.gguf import write_tiny_gguf_transformer
    from flux2_core.tiny.lora import write_tiny_lora
    from flux2_core.tiny.transformer import tiny_config

    gguf = comfy.base / "models" / "diffusion_models" / "native-flux2-dev-Q4_K_M.gguf"
    if not gguf.exists():
        write_tiny_gguf_transformer(gguf, "dev", mix="Q4_K_M", seed=31, context_dim=192)
    lora = "native_gguf_lora.safetensors"
    write_tiny_lora(comfy.base / "models" / "loras" / lora, tiny_config("dev", context_dim=192), seed=5)
    g = Graph("nat_quant")
    files = {"fp8": "flux2_dev_fp8mixed.safetensors", "gguf": gguf.name}
    size, steps, guidance = (64, 64), 2, 4.0
    enc = g.encode("mistral_3_small_flux2_bf16.safetensors", "a lighthouse at dusk")
    for tag, file in files.items():
        ours = g.model(file)
        native = g.add("Flux2LocalToNativeModel", model=ours)
        guider = g.add("BasicGuider", model=native, conditioning=Graph.out(enc, 2))
        g.save(f"{tag}_ours", g.sampler(ours, enc, size, SEED, steps, guidance))
        g.save(f"{tag}_native", g.custom_advanced(guider, size, SEED, steps))
        if tag == "gguf":
            ours_l = g.add("Flux2LocalLoRALoader", model=ours, lora_name=lora, strength=1.0)
            native_l = g.add("LoraLoaderModelOnly", model=native, lora_name=lora, strength_model=1.0)
            g.save("lora_ours", g.sampler(ours_l, enc, size, SEED, steps, guidance))
            guider_l = g.add("BasicGuider", model=native_l, conditioning=Graph.out(enc, 2))
            g.save("lora_native", g.custom_advanced(guider_l, size, SEED, steps))
    entry = comfy.run(g.nodes, timeout=600)
    assert history_error(entry) is None, history_error(entry)
    for tag in (*files, "lora"):
        ours_lat = read_latent(comfy, g.tag, f"{tag}_ours")
        assert ours_lat.std() > 0.1
        torch.testing.assert_close(read_latent(comfy, g.tag, f"{tag}_native"), ours_lat, **TOL)
    assert (
        read_latent(comfy, g.tag, "lora_ours") - read_latent(comfy, g.tag, "gguf_ours")
    ).abs().max() > 0.05
