"""Safety nodes in the real server: a filtered, watermarked and signed run; blocked runs; the check."""

from __future__ import annotations

import io
import json
import shutil

import numpy as np
import pytest
from comfy_helpers import WORKFLOWS, load, nodes_of, shrink
from comfy_server import history_error, history_images
from PIL import Image

from flux2_core.safety import read_manifest, read_watermark

KLEIN = WORKFLOWS / "flux2_klein_4b_text_to_image.api.json"
PROMPT = "A lighthouse on a cliff in a storm, oil painting"


@pytest.fixture(scope="module")
def safety_models(comfy, tmp_path_factory):
    """Tiny classifiers in models/safety, tiny yes/no Mistral judges in models/text_encoders, a test chain."""
    from flux2_core.tiny.certificates import write_test_certificate_chain
    from flux2_core.tiny.safety import write_tiny_integrity_judge, write_tiny_nsfw_classifier

    models = comfy.base / "models"
    for verdict in ("nsfw", "normal"):
        write_tiny_nsfw_classifier(models / "safety" / f"tiny-{verdict}", verdict=verdict)
    for answer in ("yes", "no"):
        write_tiny_integrity_judge(models / "text_encoders" / f"judge-{answer}", answer=answer)
    return write_test_certificate_chain(tmp_path_factory.mktemp("comfy-chain"))


def _filtered_prompt(
    chain, judge: str = "no", output_classifier: str = "tiny-normal", seed: int = 7, size: int = 128
) -> dict:
    """The klein workflow with a prompt filter before encoding and an output filter before three
    savers: ComfyUI's SaveImage, ours plain, and ours with a C2PA manifest (and the watermark from
    256x256 on, its smallest size)."""
    prompt = shrink(load(KLEIN), width=size, height=size)
    nodes_of(prompt, "Flux2LocalSampler")[0]["inputs"]["seed"] = seed
    prompt["20"] = {
        "class_type": "Flux2LocalTextEncoderLoader",
        "inputs": {"text_encoder_name": f"judge-{judge}/text_encoder/", "tokenizer": "auto", "dtype": "fp32"},
    }
    prompt["21"] = {
        "class_type": "Flux2LocalContentFilter",
        "inputs": {
            "classifier": "none",
            "nsfw_threshold": 0.85,
            "vlm_check": "prompt",
            "vlm_threshold": 0.5,
            "text_encoder": ["20", 0],
            "prompt": PROMPT,
        },
    }
    prompt["4"]["inputs"]["prompt"] = ["21", 0]
    prompt["22"] = {
        "class_type": "Flux2LocalContentFilter",
        "inputs": {
            "classifier": output_classifier,
            "nsfw_threshold": 0.85,
            "vlm_check": "off",
            "vlm_threshold": 0.5,
            "images": ["7", 0],
        },
    }
    prompt["8"]["inputs"]["images"] = ["22", 2]
    prompt["8"]["inputs"]["filename_prefix"] = "native"
    saver = {
        "images": ["22", 2],
        "format": "png",
        "jpeg_quality": 90,
        "watermark": False,
        "c2pa_certificate": "",
        "c2pa_private_key": "",
    }
    prompt["23"] = {"class_type": "Flux2LocalSaveImage", "inputs": saver | {"filename_prefix": "ours_plain"}}
    prompt["24"] = {
        "class_type": "Flux2LocalSaveImage",
        "inputs": saver
        | {
            "filename_prefix": "ours_signed",
            "watermark": size >= 256,
            "c2pa_certificate": str(chain["chain"]),
            "c2pa_private_key": str(chain["key"]),
            "model": ["1", 0],
        },
    }
    return prompt


def _model_name(comfy) -> str:
    """What the manifest should name: the variant our loader reads from the workflow's model file."""
    from flux2_core import load_transformer
    from flux2_core.safety import model_display_name

    path = comfy.base / "models" / "diffusion_models" / load(KLEIN)["1"]["inputs"]["model_name"]
    return model_display_name(load_transformer(path).config.variant)


def _run_with_workflow(comfy, prompt: dict, workflow: dict) -> dict:
    """Queues like the editor does: the UI workflow travels in extra_data.extra_pnginfo."""
    status, body = comfy.post_json(
        "/prompt",
        {
            "prompt": prompt,
            "client_id": comfy.client_id,
            "extra_data": {"extra_pnginfo": {"workflow": workflow}},
        },
    )
    assert status == 200, body
    return comfy.wait_history(body["prompt_id"])


def _outputs(comfy, entry: dict, node_id: str) -> list[bytes]:
    return [comfy.view(img) for img in entry["outputs"][node_id]["images"]]


def test_filtered_run_saves_like_save_image_with_watermark_and_manifest(comfy, safety_models):
    chain = safety_models
    workflow = {"nodes": [], "links": [], "note": "sent as the editor sends it"}
    entry = _run_with_workflow(comfy, _filtered_prompt(chain, size=256), workflow)
    assert entry["status"]["status_str"] == "success", history_error(entry)
    (native,) = _outputs(comfy, entry, "8")
    (plain,) = _outputs(comfy, entry, "23")
    (signed,) = _outputs(comfy, entry, "24")
    with Image.open(io.BytesIO(native)) as a, Image.open(io.BytesIO(plain)) as b:
        assert np.array_equal(np.asarray(a), np.asarray(b))  # same pixels as ComfyUI's SaveImage
        assert json.loads(b.info["prompt"]) == json.loads(a.info["prompt"])
        assert json.loads(b.info["workflow"]) == workflow == json.loads(a.info["workflow"])
    with Image.open(io.BytesIO(signed)) as c:
        assert json.loads(c.info["workflow"]) == workflow  # the manifest keeps the PNG's text chunks
        pixels = np.asarray(c.convert("RGB"))
    mark = read_watermark(pixels)
    assert mark.found and mark.layout == "flux2local-48"  # 256x256 of noise: 44-48 bits agree
    check = read_manifest(signed, chain["root"].read_text())
    assert check.state == "trusted" and check.model == _model_name(comfy) and check.generator == "Flux2Local"
    assert entry["outputs"]["24"]["images"][0]["filename"].startswith("ours_signed_")

    # The check node reads the same file back (uploaded into input/ byte for byte).
    name = entry["outputs"]["24"]["images"][0]["filename"]
    shutil.copy(comfy.base / "output" / name, comfy.base / "input" / name)
    check_prompt = {
        "1": {
            "class_type": "Flux2LocalCheckProvenance",
            "inputs": {"image": name, "trust_anchors": str(chain["root"])},
        }
    }
    result = comfy.run(check_prompt)
    assert result["status"]["status_str"] == "success", history_error(result)
    (report,) = result["outputs"]["1"]["text"]
    assert f"watermark found (flux2local-48, {mark.matching_bits}/48 bits match)" in report
    assert f"trusted manifest by Flux2Local, made with {_model_name(comfy)}" in report


def _blocked(comfy, prompt: dict) -> dict:
    entry = comfy.run(prompt)
    err = history_error(entry)
    assert err is not None, f"expected the content filter to stop the run, got {entry['status']}"
    assert not history_images(entry)
    assert err["node_type"] == "Flux2LocalContentFilter"
    assert err["exception_type"] == "Flux2Local.Flux2LocalError"
    return err


def test_flagged_prompt_stops_the_run_and_the_server_keeps_serving(comfy, safety_models):
    err = _blocked(comfy, _filtered_prompt(safety_models, judge="yes", seed=8))
    msg = err["exception_message"]
    assert "the prompt (input 'prompt') was flagged by the VLM integrity check" in msg
    assert "threshold 0.500" in msg
    assert err["node_id"] == "21"
    # The server keeps serving: the next prompt runs (a quick one: check an unmarked input picture).
    entry = comfy.run(
        {
            "1": {
                "class_type": "Flux2LocalCheckProvenance",
                "inputs": {"image": "flux2_reference_1.png", "trust_anchors": ""},
            }
        }
    )
    assert entry["status"]["status_str"] == "success", history_error(entry)
    (report,) = entry["outputs"]["1"]["text"]
    assert "no watermark" in report and "C2PA: no manifest" in report


def test_flagged_output_image_stops_before_saving(comfy, safety_models):
    err = _blocked(comfy, _filtered_prompt(safety_models, output_classifier="tiny-nsfw", seed=10))
    msg = err["exception_message"]
    assert "output image (input 'images') was flagged by the NSFW classifier" in msg and "0.850" in msg
    assert err["node_id"] == "22"


def test_classifier_not_installed_is_refused_with_the_input_named(comfy, safety_models):
    prompt = _filtered_prompt(safety_models)
    prompt["22"]["inputs"]["classifier"] = "not-installed"
    status, body = comfy.queue_prompt(prompt)
    assert status == 400
    errors = body["node_errors"]["22"]["errors"]
    assert any("classifier" in e["details"] and "not-installed" in e["details"] for e in errors), errors


def test_signing_without_model_or_key_is_a_clear_error(comfy, safety_models):
    prompt = _filtered_prompt(safety_models, seed=11)
    del prompt["24"]["inputs"]["model"]
    entry = comfy.run(prompt)
    err = history_error(entry)
    assert err is not None and err["node_type"] == "Flux2LocalSaveImage"
    assert "connect 'model'" in err["exception_message"]
    prompt["24"]["inputs"]["model"] = ["1", 0]
    prompt["24"]["inputs"]["c2pa_private_key"] = ""
    err = history_error(comfy.run(prompt))
    assert err is not None and "needs both c2pa_certificate and c2pa_private_key" in err["exception_message"]


def test_vlm_check_with_comfyui_mistral_file_says_what_to_load(comfy, safety_models):
    prompt = _filtered_prompt(safety_models)
    prompt["20"]["inputs"]["text_encoder_name"] = "mistral_3_small_flux2_bf16.safetensors"  # no output head
    err = _blocked(comfy, prompt)
    msg = err["exception_message"]
    assert "mistral_3_small_flux2_bf16.safetensors" in msg and "no output head" in msg
    assert "VLM check needs the encoder's language-model head" in msg and "text_encoder/ folder" in msg
