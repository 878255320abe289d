"""The shipped templates open in the real ComfyUI editor as a person would see them, and read well.

Headless Chromium (Debian's package; .ci/browser.sh installs it) loads the frontend that the session's
ComfyUI server serves at `/` (comfyui-frontend-package), with this pack's nodes registered from
/object_info and its web extension loaded. Each example_workflows/*.json goes through the editor's
own loader, ``app.loadGraphData``; then the graph is read back after the editor has laid it out:
every node has a registered type and no error flag, node and link counts and widget values match
the file, no dialog opened (missing nodes, a load error, missing models), no two node rectangles
overlap, every node sits inside one group, wires run left to right (or down within a column), and
the sampler (ours, or SamplerCustomAdvanced in the template of ComfyUI's samplers) keeps room for
its live preview. A screenshot of each is saved (see ``screenshots``).
"""

from __future__ import annotations

import copy
from pathlib import Path

import build_workflows
import pytest
from comfy_helpers import WORKFLOWS, load, ui_workflows
from editor_page import PROMPT, close_dialogs, inside, open_workflow, overlaps, screenshot

PREVIEW_ROOM = 250  # graph units left below the sampler's widgets for the live preview
SAMPLERS = ("Flux2LocalSampler", "SamplerCustomAdvanced")


def _checked_open(editor, workflow: dict, name: str) -> dict:
    seen = len(editor.console)
    report = open_workflow(editor, workflow, name)
    errors = [c for c in editor.console[seen:] if c.startswith("exception:")]
    assert not errors, f"{name}: uncaught exceptions in the page: {errors}"
    return report


@pytest.mark.parametrize("path", ui_workflows(), ids=lambda p: p.stem)
def test_editor_opens_workflow_cleanly_and_laid_out(editor, screenshots, path: Path):
    workflow = load(path)
    report = _checked_open(editor, workflow, path.name)
    where = f"{path.name} in the ComfyUI editor"
    try:
        assert not report["missing_calls"], f"{where}: missing node types {report['missing_calls']}"
        dialogs = report["dialogs"]
        assert not dialogs["keys"] and not dialogs["text"], f"{where}: a dialog opened on load: {dialogs}"
        unregistered = [(n["id"], n["type"]) for n in report["nodes"] if not n["registered"]]
        assert not unregistered, f"{where}: nodes of unregistered types {unregistered}"
        flagged = [(n["id"], n["type"]) for n in report["nodes"] if n["has_errors"]]
        assert not flagged, f"{where}: nodes flagged with errors {flagged}"
        assert sorted((n["id"], n["type"]) for n in report["nodes"]) == sorted(
            (n["id"], n["type"]) for n in workflow["nodes"]
        ), f"{where}: the graph's nodes differ from the file's"
        assert len(report["links"]) == len(workflow["links"]), f"{where}: link count differs from the file's"
        # The editor keeps every widget value the file gives (a value it cannot place, or one the file
        # lacks, e.g. a seed's control_after_generate, would show here as a difference).
        for node in workflow["nodes"]:
            got = report["widgets"][str(node["id"])]
            assert got == node["widgets_values"], (
                f"{where}: node {node['id']} ({node['type']}) widget values {got} != file's {node['widgets_values']}"
            )

        # What Run would send is the shipped API file: same nodes, inputs and values, nothing more
        # (an editor-only widget in the prompt would change the inputs and defeat ComfyUI's cache).
        slug = next(t.slug for t in build_workflows.templates() if f"{t.title}.json" == path.name)
        api = load(WORKFLOWS / f"{slug}.api.json")
        assert editor.call(PROMPT) == {
            k: {"class_type": v["class_type"], "inputs": v["inputs"]} for k, v in api.items()
        }

        # Layout, as drawn.
        assert not overlaps(report), f"{where}: overlapping nodes {overlaps(report)}"
        groups = report["groups"]
        for i, g in enumerate(groups):
            for h in groups[i + 1 :]:
                a, b = g["bounds"], h["bounds"]
                apart = (
                    a[0] + a[2] <= b[0] or b[0] + b[2] <= a[0] or a[1] + a[3] <= b[1] or b[1] + b[3] <= a[1]
                )
                assert apart, f"{where}: groups {g['title']!r} and {h['title']!r} overlap"
        by_id = {n["id"]: n for n in report["nodes"]}
        for n in report["nodes"]:
            homes = [g["title"] for g in groups if inside(n["bounds"], g["bounds"])]
            if n["type"] == "MarkdownNote":
                continue
            assert len(homes) == 1, (
                f"{where}: node {n['id']} ({n['type']}) is in groups {homes}, expected one"
            )
        for _, src, _, dst, _ in report["links"]:
            a, b = by_id[src]["bounds"], by_id[dst]["bounds"]
            same_column = abs(a[0] - b[0]) < 1
            assert b[0] >= a[0] + a[2] or (same_column and b[1] >= a[1] + a[3]), (
                f"{where}: the wire {by_id[src]['type']} -> {by_id[dst]['type']} runs right to left or upwards"
            )
        note = next(n for n in report["nodes"] if n["type"] == "MarkdownNote")
        for box in note["overflow"]:
            assert box["scroll"] <= box["client"] + 4, f"{where}: the note needs scrolling: {box}"
        # Ours, or ComfyUI's in a workflow of native samplers: both show a live preview.
        sampler = next(n for n in report["nodes"] if n["type"] in SAMPLERS)
        assert sampler["free_space"] is not None and sampler["free_space"] >= PREVIEW_ROOM, (
            f"{where}: the sampler leaves {sampler['free_space']} units for its live preview"
        )
        # Expert settings are hidden, every "0 = auto" widget reads "auto".
        loader = next(n for n in report["nodes"] if n["type"] == "Flux2LocalModelLoader")
        shown = {w["name"]: w for w in loader["widgets"]}
        assert [w["name"] for w in loader["widgets"] if w["visible"]] == ["model_name", "detected"], shown
        assert shown["vram_budget_gb"]["shown"] == "auto" and shown["pinned_ram_gb"]["shown"] == "auto"
        for steps in (w for w in sampler["widgets"] if w["name"] == "steps"):
            assert (steps["value"] == 0) == (steps["shown"] == "auto"), steps
    finally:
        screenshot(editor, screenshots, f"{path.stem} - opened")
        close_dialogs(editor)


def test_a_template_mixes_our_nodes_with_native_ones():
    """The test above opens a workflow where ComfyUI's own sampling nodes take our model and prompt."""
    native = {"Flux2LocalToNativeModel", "EasyCache", "CFGGuider", "SamplerCustomAdvanced"}
    mixed = [p.name for p in ui_workflows() if native <= {n["type"] for n in load(p)["nodes"]}]
    assert mixed, "no template mixes Flux2Local nodes with ComfyUI's samplers"


def test_layout_checks_can_fail(editor):
    """The checks above see a node moved onto another, and a wire drawn right to left."""
    workflow = copy.deepcopy(load(ui_workflows()[0]))
    nodes = {n["type"]: n for n in workflow["nodes"]}
    nodes["Flux2LocalSampler"]["pos"] = [p + 20 for p in nodes["Flux2LocalEncodePrompt"]["pos"]]
    report = _checked_open(editor, workflow, "moved.json")
    close_dialogs(editor)
    pair = {nodes["Flux2LocalSampler"]["id"], nodes["Flux2LocalEncodePrompt"]["id"]}
    assert any({a[0], b[0]} == pair for a, b in overlaps(report)), overlaps(report)


def test_editor_reports_an_unknown_node_type(editor):
    """The check above can fail: an unknown node type raises the editor's missing-nodes warning."""
    workflow = copy.deepcopy(load(ui_workflows()[0]))
    target = next(n for n in workflow["nodes"] if n["type"].startswith("Flux2Local"))
    target["type"] = "Flux2LocalNoSuchNode"
    report = _checked_open(editor, workflow, "unknown-node.json")
    close_dialogs(editor)
    assert report["missing_calls"] == [["Flux2LocalNoSuchNode"]]
    assert report["dialogs"]["keys"] == ["global-missing-nodes"], report["dialogs"]
    assert any("Flux2LocalNoSuchNode" in text for text in report["dialogs"]["text"]), report["dialogs"]
    assert [n["id"] for n in report["nodes"] if not n["registered"]] == [target["id"]]
