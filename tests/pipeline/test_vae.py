"""FLUX.2 VAE: loaders for the three layouts, parity with diffusers' AutoencoderKLFlux2, refusal of
foreign files, tiled vs untiled."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from flux2_core import CheckpointError, load_vae
from flux2_core.tiny.vae import tiny_vae_state_dict, write_tiny_vae
from flux2_core.vae import Flux2VAEConfig, patchify, unpatchify
from flux2_core.vae.tiling import resolve_tile


def _images(b=2, h=64, w=96, seed=0):
    g = torch.Generator().manual_seed(seed)
    # Smooth content plus noise, like a real picture: tiling differences stay local.
    base = torch.nn.functional.interpolate(
        torch.rand(b, 3, h // 16, w // 16, generator=g), size=(h, w), mode="bilinear", align_corners=False
    )
    return (base + 0.1 * torch.rand(b, 3, h, w, generator=g)) * 1.8 - 0.9


def _diffusers_encode(dv, x):
    with torch.no_grad():
        z = dv.encode(x).latent_dist.mode()
    mean = dv.bn.running_mean.view(1, -1, 1, 1)
    std = torch.sqrt(dv.bn.running_var.view(1, -1, 1, 1) + dv.config.batch_norm_eps)
    return (patchify(z) - mean) / std


def _diffusers_decode(dv, latents):
    mean = dv.bn.running_mean.view(1, -1, 1, 1)
    std = torch.sqrt(dv.bn.running_var.view(1, -1, 1, 1) + dv.config.batch_norm_eps)
    with torch.no_grad():
        return dv.decode(unpatchify(latents * std + mean)).sample


def test_all_layouts_load_identically(vae_files):
    models = {k: load_vae(p, dtype=torch.float32) for k, p in vae_files.items()}
    assert {k: m.checkpoint_format for k, m in models.items()} == {
        "bfl": "bfl",
        "comfyui": "comfyui",
        "diffusers": "diffusers",
    }
    ref = models["bfl"].state_dict()
    assert models["bfl"].config == Flux2VAEConfig.from_name("tiny")
    for m in models.values():
        for k, v in m.state_dict().items():
            torch.testing.assert_close(v, ref[k], rtol=0, atol=0, msg=k)
    # And they equal the written random weights (nothing left at its init value).
    written = tiny_vae_state_dict(0)
    for k, v in ref.items():
        torch.testing.assert_close(v, written[k], rtol=0, atol=0, msg=k)


def test_encode_decode_parity_with_diffusers(vae, diffusers_vae):
    x = _images()
    lat = vae.encode(x)
    assert lat.shape == (2, 128, 4, 6)
    torch.testing.assert_close(lat, _diffusers_encode(diffusers_vae, x), rtol=1e-4, atol=1e-4)
    img = vae.decode(lat)
    assert img.shape == x.shape
    torch.testing.assert_close(img, _diffusers_decode(diffusers_vae, lat), rtol=1e-4, atol=1e-4)


def test_comfyui_full_checkpoint_prefix(tmp_path, vae):
    sd = {"first_stage_model." + k: v for k, v in tiny_vae_state_dict(0).items()}
    sd["model.diffusion_model.img_in.weight"] = torch.zeros(4, 128)  # the rest of a merged checkpoint
    m = load_vae(_write(tmp_path / "merged.safetensors", sd), dtype=torch.float32)
    assert m.checkpoint_format == "comfyui"
    x = _images(b=1)
    torch.testing.assert_close(m.encode(x), vae.encode(x), rtol=0, atol=0)


def test_bf16_close_to_fp32(vae_files, vae):
    x = _images(b=1)
    low = load_vae(vae_files["comfyui"], dtype=torch.bfloat16)
    assert low.encoder.conv_in.weight.dtype == torch.bfloat16
    assert low.bn.running_var.dtype == torch.float32  # statistics stay fp32
    torch.testing.assert_close(low.encode(x), vae.encode(x), rtol=0.1, atol=0.1)


def test_patchify_channel_order():
    z = torch.arange(2 * 4 * 4, dtype=torch.float32).reshape(1, 2, 4, 4)
    p = patchify(z)
    # channel 4c + 2dy + dx at cell (i, j) holds z[c, 2i + dy, 2j + dx]
    assert p[0, 4 * 1 + 2 * 1 + 0, 1, 0] == z[0, 1, 3, 0]
    torch.testing.assert_close(unpatchify(p), z)


# Tiling ------------------------------------------------------------------------------------------
# Measured bound on the tiny random VAE (128x192 image, 128 px tiles, 32 px overlap): mean |diff| is
# ~18% (decode) / ~10% (encode) of the output std, max |diff| ~2x std. Tiles see their own GroupNorm
# statistics (one channel per group at width 32) and mid-level attention context, so tiling is not
# exact; the tests bound it at 25% / 15% of the std. The blending itself is exact (next test).
TILE_DECODE_MEAN = 0.25
TILE_ENCODE_MEAN = 0.15


def test_tile_blending_is_exact_for_local_functions():
    from flux2_core.vae.tiling import tiled_decode, tiled_encode

    cfg = Flux2VAEConfig()
    g = torch.Generator().manual_seed(0)
    lat = torch.randn(2, 128, 20, 28, generator=g)
    # A per-cell "decoder": tiling a function without spatial context must reproduce it exactly,
    # so any coverage gap or unnormalised blend weight would show.
    local = lambda t: t[:, :3].repeat_interleave(16, 2).repeat_interleave(16, 3) * 2 + 1  # noqa: E731
    full = local(lat)
    tiled = tiled_decode(local, lat, cfg, 128, torch.device("cpu"), torch.float32)
    torch.testing.assert_close(tiled, full, rtol=1e-5, atol=1e-5)
    img = torch.randn(1, 3, 320, 448, generator=g)
    enc = lambda t: torch.nn.functional.avg_pool2d(t, 16).repeat(1, 43, 1, 1)[:, :128]  # noqa: E731
    torch.testing.assert_close(
        tiled_encode(enc, img, cfg, 128, torch.device("cpu"), torch.float32), enc(img), rtol=1e-5, atol=1e-5
    )


def test_tiled_decode_close_to_untiled(vae):
    lat = vae.encode(_images(b=1, h=128, w=192))
    full = vae.decode(lat)
    tiled = vae.decode(lat, tile=128)
    diff = (tiled - full).abs()
    assert diff.mean() < TILE_DECODE_MEAN * full.std(), (diff.mean(), full.std())


def test_tiled_encode_close_to_untiled(vae):
    x = _images(b=1, h=128, w=192)
    full = vae.encode(x)
    tiled = vae.encode(x, tile=128)
    assert tiled.shape == full.shape
    diff = (tiled - full).abs()
    assert diff.mean() < TILE_ENCODE_MEAN * full.std(), (diff.mean(), full.std())


def test_tile_larger_than_image_is_exact(vae):
    lat = vae.encode(_images(b=1))
    torch.testing.assert_close(vae.decode(lat, tile=4096), vae.decode(lat), rtol=0, atol=0)
    torch.testing.assert_close(vae.decode(lat, tile="auto"), vae.decode(lat), rtol=0, atol=0)


def test_resolve_tile():
    cfg = Flux2VAEConfig()
    cpu = torch.device("cpu")
    assert resolve_tile(None, 4096, 4096, cfg, "decode", cpu, torch.float32) is None
    assert resolve_tile("auto", 512, 512, cfg, "decode", cpu, torch.float32) is None
    assert resolve_tile("auto", 2048, 2048, cfg, "decode", cpu, torch.float32) == 1024
    assert resolve_tile(500, 2048, 1024, cfg, "decode", cpu, torch.float32) == 496
    with pytest.raises(ValueError):
        resolve_tile("big", 2048, 2048, cfg, "decode", cpu, torch.float32)


@pytest.mark.gpu
def test_auto_tile_follows_free_cuda_memory():
    cfg = Flux2VAEConfig()
    dev = torch.device("cuda")
    free, _ = torch.cuda.mem_get_info(dev)
    edge = resolve_tile("auto", 16384, 16384, cfg, "decode", dev, torch.bfloat16)
    # The chosen tile's estimated activations fit in the free memory.
    assert edge is not None and edge * edge * 12 * 128 * 2 <= free


# Refusals -----------------------------------------------------------------------------------------
def _write(path, tensors):
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    return path


def _ldm_vae(z: int):
    """An LDM VAE (SD/SDXL when z=4, FLUX.1 when z=16) without the FLUX.2 latent batch-norm."""
    sd = tiny_vae_state_dict(0)
    sd = {k: v for k, v in sd.items() if not k.startswith("bn.")}
    sd["decoder.conv_in.weight"] = torch.zeros(128, z, 3, 3)
    return sd


@pytest.mark.parametrize("z, what", [(16, "FLUX.1"), (4, "SDXL")])
def test_refuses_other_vaes(tmp_path, z, what):
    path = _write(tmp_path / "other_vae.safetensors", _ldm_vae(z))
    with pytest.raises(CheckpointError, match=what) as e:
        load_vae(path)
    assert "other_vae.safetensors" in str(e.value) and "Fix:" in str(e.value)


def test_refuses_diffusers_flux1_vae_folder(tmp_path):
    from diffusers import AutoencoderKL

    blocks = ("DownEncoderBlock2D",) * 2
    AutoencoderKL(
        block_out_channels=(32, 32),
        latent_channels=16,
        down_block_types=blocks,
        up_block_types=("UpDecoderBlock2D",) * 2,
    ).save_pretrained(tmp_path / "vae")
    with pytest.raises(CheckpointError, match="FLUX.1"):
        load_vae(tmp_path)


def test_refuses_transformer_and_text_encoder(tmp_path):
    t = _write(
        tmp_path / "flux2-dev.safetensors",
        {"double_stream_modulation_img.lin.weight": torch.zeros(6, 1), "img_in.weight": torch.zeros(1, 128)},
    )
    with pytest.raises(CheckpointError, match="diffusion transformer"):
        load_vae(t)
    te = _write(tmp_path / "qwen.safetensors", {"model.layers.0.self_attn.q_proj.weight": torch.zeros(2, 2)})
    with pytest.raises(CheckpointError, match="text encoder"):
        load_vae(te)


def test_refuses_incomplete_vae(tmp_path):
    sd = tiny_vae_state_dict(0)
    del sd["decoder.up.1.block.0.conv2.weight"]
    with pytest.raises(CheckpointError, match="missing"):
        load_vae(_write(tmp_path / "ae.safetensors", sd))


def test_encode_rejects_bad_sizes(vae):
    with pytest.raises(ValueError, match="multiples of 16"):
        vae.encode(torch.zeros(1, 3, 72, 64))


def test_full_size_key_map_matches_diffusers_on_meta():
    """The published architecture (ch 128, 84 M params): every BFL key maps to diffusers' name and shape."""
    from diffusers import AutoencoderKLFlux2

    from flux2_core.vae import Flux2VAE
    from flux2_core.vae.keymap import bfl_to_diffusers_key, is_attention_projection

    with torch.device("meta"):
        ours = Flux2VAE(Flux2VAEConfig.from_name("flux2")).state_dict()
        theirs = AutoencoderKLFlux2().state_dict()
    theirs.pop("bn.num_batches_tracked")
    mapped = {bfl_to_diffusers_key(k, 4): k for k in ours}
    assert sorted(mapped) == sorted(theirs)
    for d, k in mapped.items():
        shape = ours[k].shape[:2] if is_attention_projection(k) else ours[k].shape
        assert tuple(theirs[d].shape) == tuple(shape), k
    n_params = sum(v.numel() for k, v in ours.items() if not k.startswith("bn."))
    assert 80e6 < n_params < 90e6


_COMFY_SCRIPT = r"""
import sys, torch
from safetensors.torch import load_file, save_file
sys.path.insert(0, sys.argv[1])
import comfy.cli_args
comfy.cli_args.args.cpu = True  # before comfy.model_management probes for CUDA
import comfy.utils
from comfy.ldm.models.autoencoder import AutoencoderKL
sd = load_file(sys.argv[2])
# What comfy.sd.VAE does for this file (its auto-detection hardcodes the published widths ch 128 /
# 2 blocks, so the tiny shapes go in explicitly): rename the quant convs, enable the latent BN.
sd = comfy.utils.state_dict_prefix_replace(sd, {"decoder.post_quant_conv.": "post_quant_conv.",
                                                "encoder.quant_conv.": "quant_conv."})
ddconfig = {"double_z": True, "z_channels": 32, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 32,
            "ch_mult": [1, 2, 4, 4], "num_res_blocks": 1, "attn_resolutions": [], "dropout": 0.0,
            "batch_norm_latent": True}
model = AutoencoderKL(ddconfig=ddconfig, embed_dim=32)
model.load_state_dict(sd, strict=True)
model = model.float().eval()
io = load_file(sys.argv[3])
with torch.no_grad():
    save_file({"latents": model.encode(io["images"]).contiguous(),
               "images": model.decode(io["latents"]).contiguous()}, sys.argv[4])
"""


def test_encode_decode_parity_with_comfyui(tmp_path, vae, vae_files):
    """ComfyUI's own FLUX.2 VAE class (AutoencoderKL + batch_norm_latent) loads our ComfyUI-layout file
    strictly and computes the same latents and images.

    Runs in a subprocess: importing ComfyUI changes process-wide state (its CLI args, device probing).
    """
    comfy = os.environ.get("COMFYUI_PATH", os.path.expanduser("~/ComfyUI"))
    x = _images(b=1)
    lat = vae.encode(x)
    save_file({"images": x, "latents": lat}, str(tmp_path / "io.safetensors"))
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            _COMFY_SCRIPT,
            comfy,
            vae_files["comfyui"],
            str(tmp_path / "io.safetensors"),
            str(tmp_path / "out.safetensors"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = load_file(str(tmp_path / "out.safetensors"))
    torch.testing.assert_close(out["latents"], lat, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out["images"], vae.decode(lat), rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module")
def other_settings_vae(tmp_path_factory):
    """A diffusers vae/ folder whose config.json has non-default norm groups and batch-norm epsilon."""
    cfg = Flux2VAEConfig.from_name("tiny").replace(norm_groups=16, bn_eps=1e-2)
    root = tmp_path_factory.mktemp("vae_cfg") / "pipe" / "vae"
    write_tiny_vae(root, "diffusers", seed=3, config=cfg)
    return root


def test_diffusers_config_json_is_read(other_settings_vae):
    from diffusers import AutoencoderKLFlux2

    ref = AutoencoderKLFlux2.from_pretrained(other_settings_vae).eval()
    assert ref.config.norm_num_groups == 16 and ref.config.batch_norm_eps == 1e-2
    ours = load_vae(other_settings_vae, dtype=torch.float32)
    assert ours.config.norm_groups == 16 and ours.config.bn_eps == 1e-2
    x = _images(b=1)
    lat = ours.encode(x)
    torch.testing.assert_close(lat, _diffusers_encode(ref, x), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ours.decode(lat), _diffusers_decode(ref, lat), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("layers_per_block", 3),
        ("latent_channels", 16),
        ("block_out_channels", [32, 64, 64, 64]),
        ("act_fn", "gelu"),
    ],
)
def test_diffusers_config_that_contradicts_the_weights_is_refused(other_settings_vae, tmp_path, key, value):
    import json
    import shutil

    folder = tmp_path / "vae"
    shutil.copytree(other_settings_vae, folder)
    config = json.loads((folder / "config.json").read_text())
    config[key] = value
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError) as e:
        load_vae(folder, dtype=torch.float32)
    assert "config.json" in str(e.value) and key in str(e.value)
