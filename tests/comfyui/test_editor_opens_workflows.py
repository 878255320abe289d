"""The UI-format workflows open in the real ComfyUI editor with no missing nodes, as a person would.

Headless Chromium (Debian's package; .ci/browser.sh installs it) loads the frontend that the session's
ComfyUI server serves at `/` (comfyui-frontend-package), with this pack's nodes registered from
/object_info. Each workflows/*.json (not *.api.json) goes through the editor's own loader,
``app.loadGraphData``, in one page; then the graph is read back: every node has a registered type and
no error flag, node and link counts and widget values match the file, and no dialog opened (the
"missing nodes" warning, a load error, a missing-models list). A copy with an unknown node type must
raise the missing-nodes warning, which shows that the check can fail.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

import pytest
from browser import BrowserError, Page
from comfy_helpers import load, ui_workflows

SCREENSHOT_WORKFLOW = "flux2_multi_reference.json"

# The editor as a script: the frontend's app object, its open dialogs, and closing them.
APP = "(window.comfyAPI && window.comfyAPI.app && window.comfyAPI.app.app) || window.app"
READY = f"""(() => {{
  const app = {APP};
  return !!(app && app.graph && app.canvas && window.LiteGraph
            && 'Flux2LocalSampler' in LiteGraph.registered_node_types);
}})()"""
# Open dialogs: the frontend's own dialog store (a Pinia store, reached through the extension
# manager, itself a store) by key, e.g. "global-missing-nodes", and the text the DOM shows.
DIALOG_STORE = f"({APP}).extensionManager._p._s.get('dialog')"
DIALOGS = f"""({{
  keys: {DIALOG_STORE}.dialogStack.map(d => d.key),
  text: [...document.querySelectorAll('.p-dialog')].map(d => d.innerText.trim().slice(0, 400)),
}})"""
CLOSE_DIALOGS = f"""async () => {{
  const store = {DIALOG_STORE};
  while (store.dialogStack.length) store.closeDialog(store.dialogStack[store.dialogStack.length - 1]);
  await new Promise(r => setTimeout(r, 200));
  return document.querySelectorAll('.p-dialog').length;
}}"""
# Loads one workflow through the editor's loader and reports what the graph now holds. The spy on
# showMissingNodesError sees the warning even where a setting hides its dialog.
LOAD_AND_READ = f"""async (workflow, name) => {{
  const app = {APP};
  const missingCalls = [];
  const original = app.showMissingNodesError;
  app.showMissingNodesError = function (types, ...rest) {{
    missingCalls.push(types.map(t => (typeof t === 'object' ? t.type : t)));
    return original.call(this, types, ...rest);
  }};
  try {{
    await app.loadGraphData(workflow, true, true, name);
  }} finally {{
    app.showMissingNodesError = original;
  }}
  // Let the dialogs (Vue) and the canvas render before looking.
  await new Promise(r => setTimeout(r, 300));
  await new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)));
  app.canvas.setDirty(true, true);
  app.canvas.draw(true, true);
  const graph = app.graph;
  const nodes = graph._nodes.map(n => ({{
    id: n.id,
    type: n.type,
    title: n.title,
    registered: n.type in LiteGraph.registered_node_types,
    has_errors: !!n.has_errors,
  }}));
  const saved = graph.serialize();
  return {{
    nodes,
    links: saved.links.length,
    widgets: Object.fromEntries(saved.nodes.map(n => [String(n.id), n.widgets_values ?? null])),
    missingCalls,
    dialogs: {DIALOGS},
  }};
}}"""


@pytest.fixture(scope="module")
def editor(comfy):
    """One headless Chromium on the session server's editor, ready and with no dialog open."""
    try:
        page = Page().__enter__()
    except BrowserError as e:
        failure = str(e)  # failed outside the except block, so the report is just this message
    else:
        failure = None
    if failure:
        pytest.fail(failure, pytrace=False)
    try:
        page.navigate(comfy.url + "/")
        page.wait_for(READY, timeout=90, what="the ComfyUI editor with the Flux2Local nodes")
        # A new user gets the templates browser on start: close it, so that any dialog seen later
        # comes from loading a workflow.
        left = page.call(CLOSE_DIALOGS)
        assert left == 0, f"could not close the start-up dialogs: {page.evaluate(DIALOGS)}"
        yield page
    finally:
        page.close()


def open_in_editor(editor: Page, workflow: dict, name: str) -> dict:
    report = editor.call(LOAD_AND_READ, workflow, name, timeout=60)
    editor.call(CLOSE_DIALOGS)  # leave the page clean for the next workflow
    return report


@pytest.mark.parametrize("path", ui_workflows(), ids=lambda p: p.name)
def test_editor_opens_workflow_with_no_missing_nodes(editor, path: Path, tmp_path: Path):
    workflow = load(path)
    seen = len(editor.console)
    report = open_in_editor(editor, workflow, path.name)
    where = f"{path.name} in the ComfyUI editor"
    assert not report["missingCalls"], f"{where}: missing node types {report['missingCalls']}"
    dialogs = report["dialogs"]
    assert not dialogs["keys"] and not dialogs["text"], f"{where}: a dialog opened on load: {dialogs}"
    unregistered = [(n["id"], n["type"]) for n in report["nodes"] if not n["registered"]]
    assert not unregistered, f"{where}: nodes of unregistered types {unregistered}"
    flagged = [(n["id"], n["type"]) for n in report["nodes"] if n["has_errors"]]
    assert not flagged, f"{where}: nodes flagged with errors {flagged}"
    assert sorted((n["id"], n["type"]) for n in report["nodes"]) == sorted(
        (n["id"], n["type"]) for n in workflow["nodes"]
    ), f"{where}: the graph's nodes differ from the file's"
    assert report["links"] == len(workflow["links"]), f"{where}: link count differs from the file's"
    # The editor keeps every widget value that the file gives (a value it cannot place, or one the
    # file lacks, e.g. a seed's control_after_generate, would show here as a difference).
    for node in workflow["nodes"]:
        if "widgets_values" in node:
            got = report["widgets"][str(node["id"])]
            assert got == node["widgets_values"], (
                f"{where}: node {node['id']} ({node['type']}) widget values {got} != file's {node['widgets_values']}"
            )
    if path.name == SCREENSHOT_WORKFLOW:
        # For a person to look at (FLUX2LOCAL_SCREENSHOT_DIR keeps it); the test does not read it.
        out = Path(os.environ.get("FLUX2LOCAL_SCREENSHOT_DIR") or tmp_path)
        editor.screenshot(out / f"editor-{path.stem}.png")
    errors = [c for c in editor.console[seen:] if c.startswith("exception:")]
    assert not errors, f"{where}: uncaught exceptions in the page: {errors}"


def test_editor_reports_an_unknown_node_type(editor):
    """The check above can fail: an unknown node type raises the editor's missing-nodes warning."""
    workflow = copy.deepcopy(load(ui_workflows()[0]))
    target = next(n for n in workflow["nodes"] if n["type"].startswith("Flux2Local"))
    target["type"] = "Flux2LocalNoSuchNode"
    report = open_in_editor(editor, workflow, "unknown-node.json")
    assert report["missingCalls"] == [["Flux2LocalNoSuchNode"]]
    assert report["dialogs"]["keys"] == ["global-missing-nodes"], report["dialogs"]
    assert any("Flux2LocalNoSuchNode" in text for text in report["dialogs"]["text"]), report["dialogs"]
    assert [n["id"] for n in report["nodes"] if not n["registered"]] == [target["id"]]
