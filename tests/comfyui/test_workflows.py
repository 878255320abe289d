"""The shared workflows: UI and API files agree, every node exists, every API workflow runs."""

from __future__ import annotations

import numpy as np
import pytest
from comfy_helpers import (
    FRONTEND_ONLY,
    api_workflows,
    decode_png,
    load,
    nodes_of,
    shrink,
    ui_to_api,
    ui_workflows,
)
from comfy_server import history_error, history_images


@pytest.fixture(scope="module")
def object_info(comfy):
    return comfy.get_json("/object_info")


def test_six_workflows_in_both_formats():
    api = {p.name.removesuffix(".api.json") for p in api_workflows()}
    ui = {p.name.removesuffix(".json") for p in ui_workflows()}
    assert api == ui
    assert len(api) >= 6


@pytest.mark.parametrize("path", ui_workflows(), ids=lambda p: p.name)
def test_ui_workflow_nodes_exist_and_match_api(object_info, path):
    ui = load(path)
    missing = {
        n["type"] for n in ui["nodes"] if n["type"] not in FRONTEND_ONLY and n["type"] not in object_info
    }
    assert not missing, f"{path.name}: node types missing from /object_info: {missing}"
    notes = [n for n in ui["nodes"] if n["type"] == "Note"]
    assert notes and ".safetensors" in notes[0]["widgets_values"][0], (
        f"{path.name}: no note listing model files"
    )
    api = load(path.with_name(path.name.removesuffix(".json") + ".api.json"))
    converted = ui_to_api(ui, object_info)
    assert converted == {k: {"class_type": v["class_type"], "inputs": v["inputs"]} for k, v in api.items()}


@pytest.mark.parametrize("path", api_workflows(), ids=lambda p: p.name)
def test_api_workflow_runs(comfy, path):
    # Small size and 3 steps keep tiny random models quick on 2 CPU cores; every node still runs.
    prompt = shrink(load(path), width=192, height=128, steps=3)
    entry = comfy.run(prompt)
    assert history_error(entry) is None, history_error(entry)
    assert entry["status"]["status_str"] == "success"
    images = history_images(entry)
    assert len(images) == 1
    pixels = decode_png(comfy.view(images[0]))
    assert pixels.shape == (128, 192, 3)
    assert np.isfinite(pixels).all()
    assert pixels.std() > 1e-3, "output image is constant"
    assert len(nodes_of(prompt, "SaveImage")) == 1
