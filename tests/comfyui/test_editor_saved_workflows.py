"""Workflows saved with earlier Flux2Local versions still open and run unchanged.

``data/earlier_*.json`` are UI workflows as this pack shipped them before the editor work (widget
values in the same order, 0 meaning "auto" for steps, guidance, VRAM budget and pinned RAM, a
"fixed" seed). The nodes kept their widgets, order and meanings (only how the editor shows them
changed), so the editor places every saved value back, converts the graph to the same prompt, and
the prompt runs.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from comfy_helpers import decode_png, load, nodes_of, ui_to_api
from comfy_server import history_error, history_images
from editor_page import close_dialogs, open_workflow

SAVED = sorted((Path(__file__).parent / "data").glob("earlier_*.json"))


@pytest.mark.parametrize("path", SAVED, ids=lambda p: p.stem)
def test_earlier_workflow_opens_with_its_values_and_runs(comfy, editor, path):
    workflow = load(path)
    try:
        report = open_workflow(editor, workflow, path.name)
    finally:
        close_dialogs(editor)
    assert not report["missing_calls"] and not report["dialogs"]["keys"], report["dialogs"]
    for node in workflow["nodes"]:
        if "widgets_values" in node:
            assert report["widgets"][str(node["id"])] == node["widgets_values"], node["type"]
    prompt = ui_to_api(workflow, comfy.get_json("/object_info"))
    for node in nodes_of(prompt, "Flux2LocalSampler"):
        node["inputs"].update(width=128, height=128, steps=2)
    entry = comfy.run(prompt)
    assert history_error(entry) is None, history_error(entry)
    images = history_images(entry)
    assert len(images) == 1 and decode_png(comfy.view(images[0])).shape == (128, 128, 3)
