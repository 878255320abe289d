"""The pack loads into the real ComfyUI: every node listed, in category FLUX.2, tooltips everywhere."""

from __future__ import annotations

import pytest
from comfy_server import NODE_IDS

DISPLAY_NAMES = {
    "Flux2LocalModelLoader": "FLUX.2 Model Loader",
    "Flux2LocalLoRALoader": "FLUX.2 LoRA Loader",
    "Flux2LocalTextEncoderLoader": "FLUX.2 Text Encoder Loader",
    "Flux2LocalEncodePrompt": "FLUX.2 Encode Prompt",
    "Flux2LocalMultiReference": "FLUX.2 Multi-Reference",
    "Flux2LocalSampler": "FLUX.2 Sampler",
    "Flux2LocalVAELoader": "FLUX.2 VAE Loader",
    "Flux2LocalVAEDecode": "FLUX.2 VAE Decode",
    "Flux2LocalVAEEncode": "FLUX.2 VAE Encode",
    "Flux2LocalContentFilter": "FLUX.2 Content Filter",
    "Flux2LocalSaveImage": "FLUX.2 Save Image",
    "Flux2LocalCheckProvenance": "FLUX.2 Check Provenance",
    "Flux2LocalToNativeModel": "FLUX.2 To Native MODEL",
}


@pytest.fixture(scope="module")
def object_info(comfy):
    return comfy.get_json("/object_info")


@pytest.mark.parametrize("node_id", NODE_IDS)
def test_node_listed_with_tooltips(object_info, node_id):
    info = object_info.get(node_id)
    assert info is not None, f"{node_id} missing from /object_info"
    assert info["category"] == "FLUX.2"
    assert info["display_name"] == DISPLAY_NAMES[node_id]
    inputs = info["input"].get("required", {}) | info["input"].get("optional", {})
    assert inputs
    for name, spec in inputs.items():
        opts = spec[1] if len(spec) > 1 else {}
        assert opts.get("tooltip"), f"{node_id}.{name} has no tooltip"
        if spec[0] == "COMFY_AUTOGROW_V3":
            for sub, sub_spec in opts["template"]["input"]["required"].items():
                assert sub_spec[1].get("tooltip"), f"{node_id}.{name}.{sub} has no tooltip"
    assert len(info["output_tooltips"]) == len(info["output"])
    assert all(info["output_tooltips"]), f"{node_id} has an output without tooltip"


def test_multi_reference_grows_to_ten_images(object_info):
    spec = object_info["Flux2LocalMultiReference"]["input"]["required"]["images"]
    assert spec[0] == "COMFY_AUTOGROW_V3"
    assert spec[1]["template"]["names"] == [f"image_{i}" for i in range(1, 11)]
    assert spec[1]["template"]["min"] == 1


def test_own_socket_types_and_native_latent(object_info):
    sampler = object_info["Flux2LocalSampler"]
    req = sampler["input"]["required"]
    # Ours first (the editor's default link type), ComfyUI's accepted too.
    assert req["model"][0].split(",") == ["FLUX2LOCAL_MODEL", "MODEL"]
    assert req["conditioning"][0].split(",") == ["FLUX2LOCAL_CONDITIONING", "CONDITIONING"]
    assert sampler["input"]["optional"]["negative"][0] == "CONDITIONING"
    assert sampler["output"] == ["LATENT"]
    assert object_info["Flux2LocalToNativeModel"]["output"] == ["MODEL"]
    assert object_info["Flux2LocalEncodePrompt"]["output"] == [
        "FLUX2LOCAL_CONDITIONING",
        "STRING",
        "CONDITIONING",
        "CONDITIONING",
    ]
    assert object_info["Flux2LocalVAEDecode"]["output"] == ["IMAGE"]


def test_pack_loaded_from_arbitrary_folder_name(comfy):
    log = comfy.log_tail(400)
    assert "IMPORT FAILED" not in log or "any-name_flux2pack" not in log.split("IMPORT FAILED")[1][:300]
    assert (comfy.base / "custom_nodes" / "any-name_flux2pack").is_symlink()


def test_comfyui_tree_present():
    """Fails (never skips) with instructions when COMFYUI_PATH holds no ComfyUI tree."""
    from comfy_server import comfyui_path

    assert (comfyui_path() / "comfy_api" / "latest").is_dir()
