"""Our solvers and schedules against ComfyUI's own: k-diffusion's samplers driving the same tiny
transformer, and ComfyUI's "simple" scheduler on its FLUX.2 model sampling.

ComfyUI is imported in-process without argument parsing (as its own main.py does with --cpu).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

from flux2_core import InputError, sample_latents
from flux2_core.sampling import SOLVERS, pack, schedule_sigmas, simple_sigmas, unpack
from flux2_core.sampling.tokens import image_ids, text_ids

W, H, CTX_TOKENS = 96, 64, 7


@pytest.fixture(scope="module")
def comfy():
    tree = Path(os.environ.get("COMFYUI_PATH") or Path.home() / "ComfyUI")
    if not (tree / "comfy" / "k_diffusion" / "sampling.py").is_file():
        pytest.fail(f"no ComfyUI tree at {tree}; set COMFYUI_PATH (see DEVELOPERS.md).", pytrace=False)
    if str(tree) not in sys.path:
        sys.path.insert(0, str(tree))
    import comfy.cli_args

    comfy.cli_args.args.cpu = True  # as `main.py --cpu`: no CUDA initialisation on import
    import comfy.k_diffusion.sampling as k_sampling
    import comfy.model_sampling
    import comfy.samplers

    return k_sampling, comfy.samplers, comfy.model_sampling


def _denoiser(transformer, txt):
    """ComfyUI's view of the transformer: x (B, 128, h, w), sigma (B,) -> x0 = x - sigma v (CONST)."""

    def model(x, sigma, **_):
        b, _, h, w = x.shape
        v = transformer(
            img=pack(x),
            img_ids=image_ids(h, w, batch=b),
            txt=txt,
            txt_ids=text_ids(b, txt.shape[1]),
            timesteps=sigma.float(),
        )
        return x - sigma.reshape(-1, 1, 1, 1) * unpack(v.float(), h, w)

    return model


@pytest.mark.parametrize("scheduler", ["flux2", "simple"])
@pytest.mark.parametrize("name", sorted(SOLVERS))
def test_solver_equals_comfyui_k_diffusion(comfy, tiny_models, name, scheduler):
    k_sampling, _, _ = comfy
    transformer = tiny_models("klein-4b")[0]
    g = torch.Generator().manual_seed(11)
    txt = torch.randn(1, CTX_TOKENS, transformer.config.context_dim, generator=g)
    noise = torch.randn(1, 128, H // 16, W // 16, generator=g)
    steps = 6
    ours = sample_latents(
        transformer=transformer,
        prompt_embeds=txt,
        width=W,
        height=H,
        steps=steps,
        noise=noise,
        sampler=name,
        scheduler=scheduler,
    )
    sigmas = torch.tensor(schedule_sigmas(scheduler, steps, (W // 16) * (H // 16)), dtype=torch.float32)
    with torch.no_grad():
        theirs = getattr(k_sampling, f"sample_{name}")(
            _denoiser(transformer, txt), noise.clone(), sigmas, disable=True
        )
    assert ours.std() > 0.1
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


def test_solvers_differ_from_each_other(tiny_models):
    # The multistep corrections change the result (a guard against every name running Euler).
    transformer = tiny_models("klein-4b")[0]
    g = torch.Generator().manual_seed(3)
    txt = torch.randn(1, CTX_TOKENS, transformer.config.context_dim, generator=g)
    noise = torch.randn(1, 128, H // 16, W // 16, generator=g)
    out = {
        n: sample_latents(
            transformer=transformer, prompt_embeds=txt, width=W, height=H, steps=5, noise=noise, sampler=n
        )
        for n in SOLVERS
    }
    for a in SOLVERS:
        for b in SOLVERS:
            if a < b:
                assert (out[a] - out[b]).abs().max() > 1e-3, (a, b)


@pytest.mark.parametrize("steps", [1, 4, 9, 20, 28, 50])
def test_simple_schedule_equals_comfyui(comfy, steps):
    _, samplers, model_sampling = comfy
    ms = model_sampling.ModelSamplingFlux()
    ms.set_parameters(shift=2.02)  # comfy/supported_models.py Flux2.sampling_settings
    want = samplers.simple_scheduler(ms, steps)
    got = simple_sigmas(steps)
    assert len(got) == steps + 1 and got[0] == 1.0 and got[-1] == 0.0
    torch.testing.assert_close(torch.tensor(got, dtype=torch.float32), want, rtol=0, atol=1e-6)


def test_unknown_sampler_or_scheduler_is_refused(tiny_models):
    transformer = tiny_models("klein-4b")[0]
    txt = torch.zeros(1, CTX_TOKENS, transformer.config.context_dim)
    with pytest.raises(InputError, match="unknown sampler 'lms'.*euler"):
        sample_latents(transformer=transformer, prompt_embeds=txt, width=W, height=H, steps=1, sampler="lms")
    with pytest.raises(InputError, match="unknown scheduler 'karras'.*flux2"):
        sample_latents(
            transformer=transformer, prompt_embeds=txt, width=W, height=H, steps=1, scheduler="karras"
        )
