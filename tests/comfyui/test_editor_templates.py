"""A newcomer's first hour in the real editor: the templates browser, missing models, a bad size, a run.

- Templates browser: the pack's cards are the shipped templates, each shows its picture, and each
  opens a graph with the file's nodes.
- Missing Models: a loader naming a file that is not there opens ComfyUI's dialog listing the file
  under its folder with its download URL (and nothing that is there).
- An 8192x8192 image is refused when the prompt is queued, before any node runs, with a size that
  is itself valid and keeps the aspect ratio.
- Each template runs from the editor (small size, tiny models); afterwards the Model Loader shows
  the variant, format and size it found (checked against flux2_core's own reading of the file), the
  sampler's guidance widget is named for that variant and "auto" says what it picked, and no node
  has grown onto another (loading progress, preview, result). A screenshot of each is saved after
  the run.
"""

from __future__ import annotations

import copy
import re

import pytest
from comfy_helpers import TEMPLATES, WORKFLOWS, load, ui_workflows
from editor_page import (
    APP,
    DIALOGS,
    IMAGES_SHOWN,
    READ_GRAPH,
    RUN,
    SET_WIDGETS,
    SETTLE,
    close_dialogs,
    open_workflow,
    overlaps,
    screenshot,
)

from flux2_core import load_transformer, validate_size
from flux2_core.sampling import plan_guidance

PACK = "any-name_flux2pack"  # the folder name the session server loads the pack from (conftest)
GUIDANCE_LABELS = {"embedded": "embedded guidance", "cfg": "CFG scale", "none": "guidance (not used)"}

OPEN_BROWSER = f"""async (pack) => {{
  const app = {APP};
  await app.extensionManager.command.execute('Comfy.BrowseTemplates');
  const until = async (test, ms) => {{
    for (let t = 0; t < ms; t += 100) {{ const v = test(); if (v) return v; await new Promise(r => setTimeout(r, 100)); }}
    return null;
  }};
  const entry = await until(() => [...document.querySelectorAll('.p-dialog span')].find(e => e.textContent.trim() === pack), 20000);
  if (!entry) return null;
  entry.click();
  await new Promise(r => setTimeout(r, 500));
  const cards = await until(() => {{
    const found = [...document.querySelectorAll('[data-testid^="template-workflow-"]')];
    return found.length ? found : null;
  }}, 20000) ?? [];
  const out = [];
  for (const c of cards) {{
    c.scrollIntoView({{ block: 'center' }});  // the browser loads card pictures as they come into view
    await until(() => [...c.querySelectorAll('img')].some(i => i.complete && i.naturalWidth), 10000);
    out.push({{
      name: c.dataset.testid.replace('template-workflow-', ''),
      text: c.innerText,
      images: [...c.querySelectorAll('img')].map(i => ({{ loaded: i.complete, width: i.naturalWidth, height: i.naturalHeight }})),
    }});
  }}
  return out;
}}"""
CLICK_CARD = f"""async (name) => {{
  const app = {APP};
  const card = document.querySelector(`[data-testid="template-workflow-${{name}}"]`);
  card.click();
  for (let t = 0; t < 20000 && document.querySelector('[data-testid^="template-workflow-"]'); t += 100)
    await new Promise(r => setTimeout(r, 100));
  await new Promise(r => setTimeout(r, 500));
  return app.graph._nodes.map(n => [n.id, n.type]);
}}"""


def test_template_cards_have_pictures_and_open_a_graph(editor):
    names = sorted(p.stem for p in ui_workflows())
    try:
        cards = editor.call(OPEN_BROWSER, PACK, timeout=60)
        assert cards, f"the templates browser shows no '{PACK}' entry: {editor.evaluate(DIALOGS)}"
        assert sorted(c["name"] for c in cards) == names
        for card in cards:
            assert card["name"] in card["text"], card  # titled with the file name
            assert card["images"] and all(i["loaded"] and i["width"] >= 256 for i in card["images"]), (
                f"card {card['name']!r} shows no picture: {card['images']}"
            )
    finally:
        close_dialogs(editor)
    for name in names:
        try:
            assert editor.call(OPEN_BROWSER, PACK, timeout=60), "the templates browser did not open"
            opened = editor.call(CLICK_CARD, name, timeout=60)
        finally:
            close_dialogs(editor)
        expected = sorted((n["id"], n["type"]) for n in load(TEMPLATES / f"{name}.json")["nodes"])
        assert sorted(map(tuple, opened)) == expected, f"card {name!r} opened {opened}"


def test_missing_models_dialog_names_the_folder_and_url(editor):
    workflow = copy.deepcopy(load(TEMPLATES / "FLUX.2 klein 4B - text to image.json"))
    loader = next(n for n in workflow["nodes"] if n["type"] == "Flux2LocalModelLoader")
    absent = "flux-2-klein-4b-fp8.safetensors"  # a published file the session's models folder lacks
    url = f"https://huggingface.co/black-forest-labs/FLUX.2-klein-4b-fp8/resolve/main/{absent}"
    loader["widgets_values"][0] = absent
    loader["properties"]["models"] = [{"name": absent, "url": url, "directory": "diffusion_models"}]
    try:
        report = open_workflow(editor, workflow, "missing-model.json")
        listed = editor.evaluate(
            """[...document.querySelectorAll('.p-dialog [title]')].map(e => [e.innerText.trim(), e.title])"""
        )
    finally:
        close_dialogs(editor)
    assert report["dialogs"]["keys"] == ["global-missing-models-warning"], report["dialogs"]
    text = report["dialogs"]["text"][0]
    assert f"diffusion_models / {absent}" in text, text
    assert [f"diffusion_models / {absent}", url] in listed, listed  # hovering the entry shows the URL
    for present in ("qwen_3_4b.safetensors", "flux2-vae.safetensors"):
        assert present not in text, f"{present} is there, yet listed as missing: {text}"


def test_oversized_image_is_refused_before_anything_loads(comfy, editor):
    workflow = load(TEMPLATES / "FLUX.2 klein 4B - text to image.json")
    sampler = next(n["id"] for n in workflow["nodes"] if n["type"] == "Flux2LocalSampler")
    history = len(comfy.get_json("/history"))
    try:
        open_workflow(editor, workflow, "too-big.json")
        editor.call(SET_WIDGETS, [[sampler, "width", 8192], [sampler, "height", 8192]])
        outcome = editor.call(RUN, 60_000, timeout=90)
    finally:
        close_dialogs(editor)
    assert outcome["event"] == "refused", outcome
    text = "\n".join(outcome["dialogs"]["text"])
    assert "Invalid output size 8192x8192" in text, text
    w, h = map(int, re.search(r"Fix: use e\.g\. (\d+)x(\d+)", text).groups())
    validate_size(w, h)  # the suggestion is itself accepted ...
    assert w == h and w * h > 0.9 * 4 * 1024 * 1024, (w, h)  # ... square, and as large as allowed
    # Refused while queueing: no node ran (nothing loaded), nothing entered the history.
    assert len(comfy.get_json("/history")) == history
    assert comfy.get_json("/queue") == {"queue_running": [], "queue_pending": []}

    # The same through the API: one error per size input, none under the other inputs.
    prompt = load(WORKFLOWS / "flux2_klein_4b_text_to_image.api.json")
    prompt[str(sampler)]["inputs"].update(width=8192, height=8192)
    status, body = comfy.queue_prompt(prompt)
    assert status == 400, body
    errors = body["node_errors"][str(sampler)]["errors"]
    assert sorted(e["extra_info"]["input_name"] for e in errors) == ["height", "width"], errors
    assert all(f"{w}x{h}" in e["details"] for e in errors), errors


@pytest.mark.parametrize("path", ui_workflows(), ids=lambda p: p.stem)
def test_run_from_the_editor_shows_the_detected_model(comfy, editor, screenshots, path):
    workflow = load(path)
    nodes = {n["type"]: n for n in workflow["nodes"]}
    loader = nodes["Flux2LocalModelLoader"]
    sampler = nodes.get("Flux2LocalSampler")  # None: ComfyUI's samplers (size and steps on their nodes)
    marked = "Flux2LocalSaveImage" in nodes  # the watermark needs 256x256
    size = 256 if marked else 128
    changes = []
    for kind in ("Flux2LocalSampler", "EmptyFlux2LatentImage", "Flux2Scheduler"):
        if kind in nodes:
            changes += [[nodes[kind]["id"], "width", size], [nodes[kind]["id"], "height", size]]
    steps = sampler["widgets_values"][4] if sampler else None  # after the seed and its control
    if steps:  # keep "auto" where the template has it (its label is checked below)
        changes.append([sampler["id"], "steps", 2])
    if "Flux2Scheduler" in nodes:
        changes.append([nodes["Flux2Scheduler"]["id"], "steps", 2])
    try:
        open_workflow(editor, workflow, path.name)
        editor.call(SET_WIDGETS, changes)
        outcome = editor.call(RUN, 240_000, timeout=300)
        saver = (nodes.get("SaveImage") or nodes["Flux2LocalSaveImage"])["id"]
        editor.call(IMAGES_SHOWN, [saver], 15_000, timeout=30)
        editor.call(SETTLE)
        report = editor.call(READ_GRAPH)
    finally:
        screenshot(editor, screenshots, f"{path.stem} - after run")
        close_dialogs(editor)
    assert outcome["event"] == "execution_success", outcome
    # What the nodes show after a run (the detected model, loading progress, the preview and the
    # saved image) fits in the room the layout left: nothing grew onto its neighbour.
    assert not overlaps(report), f"{path.name} after a run: overlapping nodes {overlaps(report)}"

    # What flux2_core itself reads from the file the loader names.
    model_file = comfy.base / "models" / "diffusion_models" / loader["widgets_values"][0]
    cfg = load_transformer(model_file).config
    plan = plan_guidance(cfg, None)
    by_type = {n["type"]: n for n in report["nodes"]}
    shown = {w["name"]: w for w in by_type["Flux2LocalModelLoader"]["widgets"]}["detected"]["value"]
    assert f"{cfg.depth} double + {cfg.depth_single} single blocks, hidden {cfg.hidden_size}" in shown, shown
    expected_kind = {"embedded": "embedded guidance", "cfg": "CFG", "none": "no guidance"}[plan.mode]
    assert expected_kind in shown and f"{plan.default_steps} steps" in shown, shown
    assert ("GGUF" in shown) == model_file.name.endswith(".gguf"), shown

    if sampler:
        widgets = {w["name"]: w for w in by_type["Flux2LocalSampler"]["widgets"]}
        assert widgets["guidance"]["label"] == GUIDANCE_LABELS[plan.mode], widgets["guidance"]
        if not steps:
            assert widgets["steps"]["shown"] == f"auto ({plan.default_steps})", widgets["steps"]
    saver = by_type.get("SaveImage") or by_type["Flux2LocalSaveImage"]
    assert saver["images"] >= 1, "the saved image is not shown on the save node"


def test_cached_loader_shows_what_it_found_after_a_reload(comfy, editor):
    """ComfyUI sends a cached loader no output; the editor recalls it from the history, even when
    the history holds a prompt with NaN in it (which JSON.parse refuses as Python writes it)."""
    from editor_page import CLOSE_DIALOGS, READY

    path = TEMPLATES / "FLUX.2 klein base 4B - with CFG.json"
    workflow = load(path)
    prompt = load(WORKFLOWS / "flux2_klein_base_cfg.api.json")
    for node in prompt.values():
        if node["class_type"] == "Flux2LocalSampler":
            node["inputs"].update(width=64, height=64, steps=1)
    assert comfy.run(prompt)["status"]["status_str"] == "success"  # the loader has run with these settings
    broken = copy.deepcopy(prompt)
    next(n for n in broken.values() if n["class_type"] == "Flux2LocalSampler")["inputs"]["guidance"] = float(
        "nan"
    )
    comfy.run(broken)  # refused by the sampler; its prompt, NaN included, stays in the history
    # A fresh page: nothing remembered in it. Without the stored tabs it opens no earlier workflow,
    # whose loading would race the one below (the frontend's model-folder listing is shared, and a
    # folder still loading for one graph reads as empty to the other: a false Missing Models).
    editor.evaluate("localStorage.clear(), sessionStorage.clear(), true")
    editor.navigate(comfy.url + "/")
    editor.wait_for(READY, timeout=90, what="the reloaded editor")
    editor.call(CLOSE_DIALOGS)
    editor.call(SETTLE)
    sampler = next(n["id"] for n in workflow["nodes"] if n["type"] == "Flux2LocalSampler")
    try:
        open_workflow(editor, workflow, path.name)
        editor.call(SET_WIDGETS, [[sampler, "width", 96], [sampler, "height", 96], [sampler, "steps", 1]])
        outcome = editor.call(RUN, 120_000, timeout=180)
        editor.call(SETTLE)
        report = editor.call(READ_GRAPH)
    finally:
        close_dialogs(editor)
    assert outcome["event"] == "execution_success", outcome
    loader = next(n for n in report["nodes"] if n["type"] == "Flux2LocalModelLoader")
    last = list(comfy.get_json("/history?max_items=1").values())[0]
    cached = next(m[1]["nodes"] for m in last["status"]["messages"] if m[0] == "execution_cached")
    assert str(loader["id"]) in cached, f"the loader ran again (not cached): {cached}"
    shown = {w["name"]: w["value"] for w in loader["widgets"]}["detected"]
    assert "CFG 4 with the negative prompt" in shown, shown
