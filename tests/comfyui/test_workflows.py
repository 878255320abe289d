"""The shipped workflows: UI and API files agree, every node exists, every API workflow runs."""

from __future__ import annotations

import re
from urllib.parse import urlparse

import build_workflows
import numpy as np
import pytest
from comfy_helpers import (
    FRONTEND_ONLY,
    TEMPLATES,
    WORKFLOWS,
    api_workflows,
    decode_png,
    load,
    nodes_of,
    shrink,
    ui_to_api,
    ui_workflows,
)
from comfy_server import history_error, history_images
from layout import WIDGETS

TEMPLATE_LIST = build_workflows.templates()
LOADER_INPUTS = {
    "Flux2LocalModelLoader": "model_name",
    "Flux2LocalTextEncoderLoader": "text_encoder_name",
    "Flux2LocalVAELoader": "vae_name",
    "Flux2LocalLoRALoader": "lora_name",
}


@pytest.fixture(scope="module")
def object_info(comfy):
    return comfy.get_json("/object_info")


def test_every_template_in_both_formats_with_a_card_picture():
    assert {p.name for p in ui_workflows()} == {f"{t.title}.json" for t in TEMPLATE_LIST}
    assert {p.name for p in api_workflows()} == {f"{t.slug}.api.json" for t in TEMPLATE_LIST}
    assert {p.name for p in TEMPLATES.glob("*.jpg")} == {f"{t.title}.jpg" for t in TEMPLATE_LIST}
    # ComfyUI lists the top of example_workflows/ (and of workflows/, were it the first such folder):
    # no JSON may sit at the top of workflows/, where it would be listed as a card and never served.
    assert not list(WORKFLOWS.parent.glob("*.json"))
    assert len(TEMPLATE_LIST) >= 8


@pytest.mark.parametrize("template", TEMPLATE_LIST, ids=lambda t: t.slug)
def test_ui_workflow_nodes_exist_and_match_api(object_info, template):
    ui = load(TEMPLATES / f"{template.title}.json")
    missing = {
        n["type"] for n in ui["nodes"] if n["type"] not in FRONTEND_ONLY and n["type"] not in object_info
    }
    assert not missing, f"{template.title}: node types missing from /object_info: {missing}"
    api = load(WORKFLOWS / f"{template.slug}.api.json")
    converted = ui_to_api(ui, object_info)
    assert converted == {k: {"class_type": v["class_type"], "inputs": v["inputs"]} for k, v in api.items()}


@pytest.mark.parametrize("template", TEMPLATE_LIST, ids=lambda t: t.slug)
def test_note_links_every_model_file(comfy, template):
    """A Markdown note links each file the loaders name; each loader feeds the Missing Models dialog."""
    ui = load(TEMPLATES / f"{template.title}.json")
    notes = [n for n in ui["nodes"] if n["type"] == "MarkdownNote"]
    assert len(notes) == 1, f"{template.title}: expected one Markdown note"
    text = notes[0]["widgets_values"][0]
    links = dict(re.findall(r"\[([^\]]+)\]\((https://[^)]+)\)", text))
    folders = set(comfy.get_json("/models"))
    for node in ui["nodes"]:
        if node["type"] not in LOADER_INPUTS:
            continue
        name = dict(zip(WIDGETS[node["type"]], node["widgets_values"]))[LOADER_INPUTS[node["type"]]]
        assert name in links and urlparse(links[name]).hostname == "huggingface.co", (
            f"{template.title}: the note gives no download link for {name}"
        )
        entries = node["properties"].get("models")
        if not name.endswith((".safetensors", ".sft")):
            # The dialog refuses other files (it would show an error): the note's link is the help.
            assert not entries, f"{template.title}: {name} cannot be listed by the Missing Models dialog"
            continue
        assert entries == [{"name": name, "url": links[name], "directory": entries[0]["directory"]}], entries
        directory = entries[0]["directory"]
        assert directory in folders and directory not in ("unet", "clip"), directory
        assert f"models/{directory}/" in text


def _size_for(prompt: dict) -> tuple[int, int]:
    # The invisible watermark needs at least 256x256; everything else runs smaller (tiny models, 2 cores).
    marked = any(n["inputs"].get("watermark") for n in nodes_of(prompt, "Flux2LocalSaveImage"))
    return (256, 256) if marked else (192, 128)


@pytest.mark.parametrize("path", api_workflows(), ids=lambda p: p.name)
def test_api_workflow_runs(comfy, path):
    # Small size and 3 steps keep tiny random models quick on 2 CPU cores; every node still runs.
    width, height = _size_for(load(path))
    prompt = shrink(load(path), width=width, height=height, steps=3)
    entry = comfy.run(prompt)
    assert history_error(entry) is None, history_error(entry)
    assert entry["status"]["status_str"] == "success"
    images = history_images(entry)
    assert len(images) == 1
    pixels = decode_png(comfy.view(images[0]))
    assert pixels.shape == (height, width, 3)
    assert np.isfinite(pixels).all()
    assert pixels.std() > 1e-3, "output image is constant"
    # The loader reports what it found, for the editor (shown on the node) and API clients; a loader
    # that ComfyUI took from its cache (the same model as the workflow before) reports nothing.
    loader = next(k for k, v in prompt.items() if v["class_type"] == "Flux2LocalModelLoader")
    cached = [n for kind, m in entry["status"]["messages"] if kind == "execution_cached" for n in m["nodes"]]
    if loader in cached:
        return
    shown = entry["outputs"][loader]
    assert shown["text"] and shown["flux2local_model"][0]["guidance"] in ("embedded", "cfg", "none")
