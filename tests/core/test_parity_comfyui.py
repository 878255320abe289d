"""Forward parity with ComfyUI's own FLUX.2 model (``comfy.ldm.flux.model.Flux``) from the pinned tree:
the tiny file goes through ComfyUI's key detection, its strict state-dict load and its own id building
(text positions, target grid, reference images with the "index" method: t = 10, 20, ...)."""

import os
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from flux2_core import load_transformer

COMFY = Path(os.environ.get("COMFYUI_PATH", Path.home() / "ComfyUI"))


@pytest.fixture(scope="module")
def comfy():
    if not (COMFY / "comfy" / "ldm" / "flux" / "model.py").is_file():
        # Parity with ComfyUI is a required check, never silently skipped.
        pytest.fail(
            f"no pinned ComfyUI tree at {COMFY}: extract it as DEVELOPERS.md says (or set COMFYUI_PATH)"
        )
    sys.path.insert(0, str(COMFY))
    try:
        import comfy.cli_args

        comfy.cli_args.args.cpu = True  # import without a GPU
        import comfy.ldm.flux.model as flux_model
        import comfy.model_detection
        import comfy.ops
    finally:
        sys.path.remove(str(COMFY))
    return flux_model, comfy.model_detection, comfy.ops


def _ids(t, h, w):
    ids = torch.zeros(h * w, 4)
    ids[:, 0] = t
    ids[:, 1] = torch.arange(h * w) // w
    ids[:, 2] = torch.arange(h * w) % w
    return ids


@pytest.mark.parametrize("variant, layout", [("dev", "comfyui"), ("klein-9b", "bfl")])
def test_forward_matches_comfyui(comfy, tiny_files, variant, layout):
    flux_model, detection, ops = comfy
    path = tiny_files(variant, layout)
    ours = load_transformer(path, dtype=torch.float32)
    sd = load_file(str(path))
    prefix = "model.diffusion_model." if layout == "comfyui" else ""
    unet_config = detection.detect_unet_config(sd, prefix)
    assert unet_config["image_model"] == "flux2" and unet_config["num_heads"] == 2
    unet_config.pop("image_model")
    theirs = flux_model.Flux(
        image_model="flux2",
        dtype=torch.float32,
        device="cpu",
        operations=ops.disable_weight_init,
        **unet_config,
    )
    theirs.load_state_dict({k[len(prefix) :]: v for k, v in sd.items()}, strict=True)

    g = torch.Generator().manual_seed(3)
    c = ours.config
    x = torch.randn(1, 128, 4, 6, generator=g)  # target latent (B, 128, h, w)
    refs = [torch.randn(1, 128, 4, 4, generator=g), torch.randn(1, 128, 2, 4, generator=g)]
    ctx = torch.randn(1, 9, c.context_dim, generator=g)
    sigma = torch.tensor([0.6])
    guidance = torch.tensor([3.5]) if c.guidance_embed else None
    with torch.no_grad():
        want = theirs(x, sigma, ctx, guidance=guidance, ref_latents=refs)  # (B, 128, h, w)
        tokens = [x.flatten(2).transpose(1, 2)] + [r.flatten(2).transpose(1, 2) for r in refs]
        ids = [_ids(0, 4, 6), _ids(10, 4, 4), _ids(20, 2, 4)]
        txt_ids = torch.zeros(1, 9, 4)
        txt_ids[..., 3] = torch.arange(9)
        got = ours(
            img=torch.cat(tokens, 1),
            img_ids=torch.cat(ids)[None],
            txt=ctx,
            txt_ids=txt_ids,
            timesteps=sigma,
            guidance=guidance,
        )[:, :24]
    torch.testing.assert_close(got, want.flatten(2).transpose(1, 2), rtol=1e-4, atol=1e-4)
