"""Presets, full-size key sets and parameter counts on the meta device, config inference from shapes."""

import pytest
import torch

from flux2_core import Flux2Config, Flux2Transformer
from flux2_core.config import PRESETS, bfl_shapes, config_from_bfl_shapes

PARAMS = {"dev": 32_223_281_152, "klein-4b": 3_875_544_576, "klein-9b": 9_078_581_248}


@pytest.mark.parametrize("name", list(PRESETS))
def test_full_size_keys_and_params_on_meta(name):
    config = Flux2Config.from_name(name)
    with torch.device("meta"):
        model = Flux2Transformer(config, dtype=torch.bfloat16)
    sd = model.state_dict()
    shapes = bfl_shapes(config)
    assert sorted(sd) == sorted(shapes)
    assert {k: tuple(v.shape) for k, v in sd.items()} == shapes
    family = "dev" if name == "dev" else "klein-4b" if "4b" in name else "klein-9b"
    assert sum(v.numel() for v in sd.values()) == PARAMS[family]
    assert ("guidance_in.in_layer.weight" in sd) == (name == "dev")
    assert model.streamable_blocks == ("double_blocks", "single_blocks")
    assert len(model.double_blocks) == config.depth and len(model.single_blocks) == config.depth_single


@pytest.mark.parametrize(
    "name, hint, distilled, expected",
    [
        ("dev", "flux2-dev.safetensors", None, "dev"),
        ("klein-4b", "flux-2-klein-4b.safetensors", None, "klein-4b"),
        ("klein-4b", "flux-2-klein-base-4b-fp8.safetensors", None, "klein-base-4b"),
        ("klein-9b", "flux-2-klein-9b.safetensors", None, "klein-9b"),
        ("klein-9b", "flux-2-klein-base-9b.safetensors", None, "klein-base-9b"),
        ("klein-9b", "flux-2-klein-9b-kv-fp8.safetensors", None, "klein-9b-kv"),
        ("klein-9b", "FLUX.2-klein-9b-kv", None, "klein-9b-kv"),
        ("klein-9b", "FLUX.2-klein-9B", False, "klein-base-9b"),
        ("klein-4b", "my_model.safetensors", None, "klein-4b"),
        # names never override the architecture read from the shapes
        ("klein-4b", "flux2-dev.safetensors", None, "klein-4b"),
    ],
)
def test_inference_from_shapes(name, hint, distilled, expected):
    config = config_from_bfl_shapes(bfl_shapes(Flux2Config.from_name(name)), hint, distilled)
    assert config == PRESETS[expected]


def test_custom_shapes_keep_flags():
    tiny = Flux2Config.from_name("klein-9b").replace(
        variant="custom", hidden_size=256, num_heads=2, depth=1, depth_single=3, context_dim=64
    )
    got = config_from_bfl_shapes(bfl_shapes(tiny), "flux-2-klein-base-9b-kv.safetensors")
    assert (got.variant, got.depth, got.depth_single, got.context_dim) == ("custom", 1, 3, 64)
    assert got.kv_refs and not got.distilled and not got.guidance_embed


def test_bad_config_and_name():
    with pytest.raises(ValueError, match="unknown FLUX.2 variant"):
        Flux2Config.from_name("flux1")
    with pytest.raises(ValueError, match="hidden_size"):
        Flux2Config(hidden_size=1000)
