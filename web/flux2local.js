// Flux2Local's editor extension: how the pack's nodes read in the ComfyUI editor.
//
// - Expert settings (inputs the server marks "advanced") stay hidden until "Show Advanced" in the
//   node's context menu. The pinned frontend (1.37) has that menu entry and hides such widgets from
//   drawing, but never sets the flag on the widget and still reserves their space; both are done here.
// - Number widgets whose 0 means "auto" (the server marks them flux2local_auto) show "auto", and once
//   the connected FLUX.2 Model Loader has run, what auto picks for that model (e.g. "auto (4)").
// - FLUX.2 Model Loader shows what it detected after a run (variant, format, size, storage mix), and
//   the sampler's guidance widget is named for what it sets on that model: embedded guidance
//   ([dev]), CFG scale (base [klein]) or nothing (distilled [klein]).
//   When ComfyUI reuses a cached loader (nothing to run), the text comes from the last run of a
//   loader with the same settings in ComfyUI's history.
// Widget values and their order are the server's: saved workflows are unaffected by this file.

const { app } = window.comfyAPI.app;
const { api } = window.comfyAPI.api;

const PACK_PREFIX = "Flux2Local";
const LOADER = "Flux2LocalModelLoader";
const LORA = "Flux2LocalLoRALoader";
const SAMPLER = "Flux2LocalSampler";
const INFO_WIDGET = "detected";
const GUIDANCE_LABELS = { embedded: "embedded guidance", cfg: "CFG scale", none: "guidance (not used)" };

function inputSpecs(nodeData) {
  const specs = {};
  for (const group of ["required", "optional"]) {
    for (const [name, spec] of Object.entries(nodeData.input?.[group] ?? {})) specs[name] = spec?.[1] ?? {};
  }
  return specs;
}

function inheritedGetter(obj, prop) {
  for (let proto = Object.getPrototypeOf(obj); proto; proto = Object.getPrototypeOf(proto)) {
    const desc = Object.getOwnPropertyDescriptor(proto, prop);
    if (desc?.get) return desc.get;
  }
  return null;
}

// The FLUX.2 Model Loader that feeds a node's "model" input, through any LoRA loaders.
function upstreamLoader(node) {
  for (let hops = 0; node && hops < 32; hops++) {
    if (node.type === LOADER) return node;
    const slot = node.inputs?.find((i) => i.name === "model");
    const link = slot?.link != null ? node.graph?.links?.get?.(slot.link) ?? node.graph?.links?.[slot.link] : null;
    if (!link) return null;
    node = node.graph.getNodeById(link.origin_id);
    if (node && node.type !== LOADER && node.type !== LORA) return null;
  }
  return null;
}

function modelFacts(node) {
  return upstreamLoader(node)?.flux2localModel ?? null;
}

function hideAdvanced(node, widget) {
  if (widget.advanced !== undefined || !widget.options?.advanced) return; // the frontend does it
  widget.advanced = true;
  let own;
  Object.defineProperty(widget, "hidden", {
    configurable: true,
    get: () => own ?? !node.showAdvanced,
    set: (v) => {
      own = v || undefined;
    },
  });
}

function showAuto(node, widget, kind) {
  const base = inheritedGetter(widget, "_displayValue");
  if (!base) return;
  Object.defineProperty(widget, "_displayValue", {
    configurable: true,
    get() {
      if (this.computedDisabled || Number(this.value) !== 0) return base.call(this);
      const facts = modelFacts(node);
      if (kind === "steps" && facts) return `auto (${facts.default_steps})`;
      if (kind === "guidance" && facts) return facts.guidance === "none" ? "auto (none)" : `auto (${facts.default_guidance})`;
      return "auto";
    },
  });
}

function nameGuidance(node, widget) {
  let own;
  Object.defineProperty(widget, "label", {
    configurable: true,
    get: () => own ?? GUIDANCE_LABELS[modelFacts(node)?.guidance] ?? undefined,
    set: (v) => {
      own = v || undefined;
    },
  });
}

function addInfoWidget(node) {
  const widgets = window.comfyAPI?.widgets?.ComfyWidgets;
  if (!widgets?.STRING) return;
  const widget = widgets.STRING(node, INFO_WIDGET, ["STRING", { multiline: true }], app).widget;
  // Not a setting: never in widgets_values (serialize) nor in the prompt (options.serialize), where
  // it would change the loader's inputs after each run and make ComfyUI load the model again.
  widget.serialize = false;
  widget.options.serialize = false;
  if (widget.element) {
    widget.element.readOnly = true;
    widget.element.placeholder = "After a run: the detected FLUX.2 variant, format, size and storage types.";
  }
  widget.value = "";
}

// What each loader setting showed, by its settings, for cached runs in this page.
const seen = new Map();

function loaderSettings(node) {
  const values = (node.widgets ?? []).filter((w) => w.serialize !== false).map((w) => [w.name, w.value]);
  return Object.fromEntries(values);
}

function showDetected(node, output) {
  node.flux2localModel = output?.flux2local_model?.[0] ?? null;
  const widget = node.widgets?.find((w) => w.name === INFO_WIDGET);
  if (widget) widget.value = (output?.text ?? []).join("\n");
  node.graph?.setDirtyCanvas(true, true);
}

// Python's json writes NaN, Infinity and -Infinity bare (a client may have queued them) and
// JSON.parse refuses them: make them null, leaving string contents alone.
function pythonJson(text) {
  return text.replace(/"(?:[^"\\]|\\.)*"|-?Infinity|NaN/g, (token) => (token[0] === '"' ? token : "null"));
}

async function recentHistory() {
  try {
    const text = await (await api.fetchApi("/history?max_items=200")).text();
    return JSON.parse(pythonJson(text));
  } catch {
    return {};
  }
}

// A cached loader does not run, so ComfyUI sends it no output: show what the same settings showed
// before, in this page or in ComfyUI's history.
async function recallCached(nodeIds) {
  const loaders = nodeIds
    .map((id) => app.graph?.getNodeById?.(Number(id)))
    .filter((n) => n?.type === LOADER);
  const missing = [];
  for (const node of loaders) {
    const known = seen.get(JSON.stringify(loaderSettings(node)));
    if (known) showDetected(node, known);
    else missing.push(node);
  }
  if (!missing.length) return;
  const entries = Object.values(await recentHistory()).reverse(); // newest first
  for (const node of missing) {
    const settings = loaderSettings(node);
    for (const entry of entries) {
      const prompt = entry?.prompt?.[2] ?? {};
      const match = Object.entries(prompt).find(
        ([id, n]) =>
          n.class_type === LOADER &&
          entry.outputs?.[id]?.text &&
          Object.entries(n.inputs ?? {}).every(([k, v]) => !(k in settings) || settings[k] === v),
      );
      if (match) {
        showDetected(node, entry.outputs[match[0]]);
        break;
      }
    }
  }
}

app.registerExtension({
  name: "Flux2Local.editor",
  setup() {
    api.addEventListener("execution_cached", (e) => recallCached(e.detail?.nodes ?? []));
  },
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (!nodeData.name?.startsWith(PACK_PREFIX)) return;
    const specs = inputSpecs(nodeData);
    const created = nodeType.prototype.onNodeCreated;
    nodeType.prototype.onNodeCreated = function () {
      const result = created?.apply(this, arguments);
      for (const widget of this.widgets ?? []) {
        const spec = specs[widget.name] ?? {};
        hideAdvanced(this, widget);
        if (spec.flux2local_auto) showAuto(this, widget, spec.flux2local_auto);
        if (nodeData.name === SAMPLER && widget.name === "guidance") nameGuidance(this, widget);
      }
      if (nodeData.name === LOADER) addInfoWidget(this);
      this.setSize(this.computeSize());
      return result;
    };
    if (nodeData.name === LOADER) {
      const executed = nodeType.prototype.onExecuted;
      nodeType.prototype.onExecuted = function (output) {
        executed?.apply(this, arguments);
        if (output?.text) seen.set(JSON.stringify(loaderSettings(this)), output);
        showDetected(this, output);
      };
    }
  },
});
