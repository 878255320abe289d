"""The ComfyUI editor as the browser tests drive it: JavaScript run in the page, and what it reports.

Everything goes through the frontend's own objects (``app``, LiteGraph's graph and canvas, the
dialog store), so what is checked is what a person sees: node bounds after the editor has laid the
nodes out, the dialogs it opens, the widgets it draws.
"""

from __future__ import annotations

import re
from pathlib import Path

from browser import Page

APP = "(window.comfyAPI && window.comfyAPI.app && window.comfyAPI.app.app) || window.app"
API = "window.comfyAPI.api.api"
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
  text: [...document.querySelectorAll('.p-dialog')].map(d => d.innerText.trim().slice(0, 2000)),
}})"""
CLOSE_DIALOGS = f"""async () => {{
  const store = {DIALOG_STORE};
  while (store.dialogStack.length) store.closeDialog(store.dialogStack[store.dialogStack.length - 1]);
  await new Promise(r => setTimeout(r, 200));
  return document.querySelectorAll('.p-dialog').length;
}}"""
SETTLE = f"""async () => {{
  await new Promise(r => setTimeout(r, 300));
  await new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)));
  const app = {APP};
  app.canvas.setDirty(true, true);
  app.canvas.draw(true, true);
}}"""
# What the graph holds once the editor has laid it out: every node's bounds (title bar included)
# and widgets as drawn, the groups, the links and the serialized widget values.
READ_GRAPH = f"""() => {{
  const app = {APP};
  const graph = app.graph;
  const nodes = graph._nodes.map(n => ({{
    id: n.id,
    type: n.type,
    title: n.title,
    registered: n.type in LiteGraph.registered_node_types,
    has_errors: !!n.has_errors,
    bounds: [...n.getBounding()],
    // Room left below the widgets (LiteGraph's own figure); a node without widgets (e.g.
    // SamplerCustomAdvanced) has room below its rows of sockets.
    free_space: n.freeWidgetSpace ?? ((n.widgets ?? []).length ? null
      : n.size[1] - Math.max((n.inputs ?? []).length, (n.outputs ?? []).length) * LiteGraph.NODE_SLOT_HEIGHT),
    images: (n.imgs ?? []).length,
    // DOM widgets (the Markdown note, multiline text): how much of their content they show.
    overflow: (n.widgets ?? []).filter(w => w.element).map(w => {{
      const el = w.element.querySelector('.ProseMirror') ?? w.element;
      return {{name: w.name, scroll: el.scrollHeight, client: w.element.clientHeight}};
    }}),
    widgets: (n.widgets ?? []).map(w => ({{
      name: w.name, label: w.label ?? null, value: w.value, shown: w._displayValue ?? null,
      visible: n.isWidgetVisible ? n.isWidgetVisible(w) : !w.hidden,
    }})),
  }}));
  const saved = graph.serialize();
  return {{
    nodes,
    groups: graph._groups.map(g => ({{ title: g.title, bounds: [...g._bounding] }})),
    links: saved.links.map(l => Array.isArray(l) ? l.slice(0, 5) : [l.id, l.origin_id, l.origin_slot, l.target_id, l.target_slot]),
    widgets: Object.fromEntries(saved.nodes.map(n => [String(n.id), n.widgets_values ?? null])),
    dialogs: {DIALOGS},
  }};
}}"""
# Loads a workflow through the editor's loader. The spy on showMissingNodesError sees the warning
# even where a setting hides its dialog.
LOAD = f"""async (workflow, name) => {{
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
  return missingCalls;
}}"""
# Queues the graph as the Run button does and waits for the server to finish it.
RUN = f"""async (timeoutMs) => {{
  const app = {APP}, api = {API};
  const outcome = new Promise(resolve => {{
    const done = e => resolve({{ event: e.type, detail: e.detail ?? null }});
    for (const kind of ['execution_success', 'execution_error', 'execution_interrupted'])
      api.addEventListener(kind, done, {{ once: true }});
  }});
  await app.queuePrompt(0);
  const dialogs = {DIALOGS};
  if (dialogs.keys.length) return {{ event: 'refused', dialogs }};
  const timer = new Promise(r => setTimeout(() => r({{ event: 'timeout' }}), timeoutMs));
  const result = await Promise.race([outcome, timer]);
  await new Promise(r => setTimeout(r, 500));  // the last executed / preview messages
  return result;
}}"""
# Waits (up to ms) until each node of ``ids`` shows an image: the editor fetches a saved image from
# /view after the run's last message, so it can come after execution_success.
IMAGES_SHOWN = f"""async (ids, ms) => {{
  const app = {APP};
  const shown = () => ids.every(id => (app.graph.getNodeById(id)?.imgs ?? []).length > 0);
  for (let t = 0; t < ms && !shown(); t += 100) await new Promise(r => setTimeout(r, 100));
  return shown();
}}"""
SET_WIDGETS = f"""(values) => {{
  const app = {APP};
  for (const [id, name, value] of values) {{
    const node = app.graph.getNodeById(id);
    const widget = node.widgets.find(w => w.name === name);
    widget.value = value;
    widget.callback?.(value);
  }}
}}"""


def open_workflow(page: Page, workflow: dict, name: str) -> dict:
    """Loads ``workflow`` in the editor; returns the graph as laid out plus the missing-nodes calls."""
    missing = page.call(LOAD, workflow, name, timeout=60)
    page.call(SETTLE)
    report = page.call(READ_GRAPH)
    report["missing_calls"] = missing
    return report


def close_dialogs(page: Page) -> int:
    return page.call(CLOSE_DIALOGS)


def overlaps(report: dict, margin: float = 0.0) -> list[tuple]:
    """Pairs of nodes whose rectangles (title bars included) intersect, with their ids and types."""
    found = []
    nodes = report["nodes"]
    for i, a in enumerate(nodes):
        ax, ay, aw, ah = a["bounds"]
        for b in nodes[i + 1 :]:
            bx, by, bw, bh = b["bounds"]
            if (
                ax < bx + bw + margin
                and bx < ax + aw + margin
                and ay < by + bh + margin
                and by < ay + ah + margin
            ):
                found.append(((a["id"], a["type"]), (b["id"], b["type"])))
    return found


def inside(inner: list[float], outer: list[float]) -> bool:
    x, y, w, h = inner
    gx, gy, gw, gh = outer
    return gx <= x and gy <= y and x + w <= gx + gw and y + h <= gy + gh


def screenshot(page: Page, folder: Path, name: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    safe = re.sub(r"[^A-Za-z0-9._ -]+", "_", name)
    return page.screenshot(folder / f"{safe}.png")


# The prompt the editor would queue for the open graph (what Run sends), without the titles.
PROMPT = f"""async () => {{
  const {{ output }} = await ({APP}).graphToPrompt();
  return Object.fromEntries(Object.entries(output).map(([id, n]) => [id, {{ class_type: n.class_type, inputs: n.inputs }}]));
}}"""
