"""Test-only ComfyUI pack: hands Flux2Local's conditioning to ComfyUI's native FLUX.2 nodes.

The parity test runs the same prompt embeddings through our sampler and through native
BasicGuider + SamplerCustomAdvanced. ComfyUI's native CLIPLoader cannot load our tiny random text
encoders (it detects Mistral/Qwen3 by their real sizes), so both paths get the embeddings that
FLUX.2 Encode Prompt produced, converted here into a native CONDITIONING. Linked into custom_nodes
by tests/comfyui/conftest.py only; never shipped.

Flux2LocalTestTinyCLIPLoader is ComfyUI's own CLIPLoader (type flux2) with one change: while it
builds the CLIP, ComfyUI's Qwen3-4B size table holds the tiny file's sizes and its detection (which
keys on the published hidden width 2560) names the tiny file Qwen3-4B. Model code, tokenizer, layer
selection, stacking and CLIPTextEncode are ComfyUI's.

Flux2LocalTestTruncateFile truncates a file between two nodes of one prompt (after the loader ran,
before the sampler uses the model), which no HTTP request can time reliably.
Flux2LocalTestOutOfMemoryOnce makes the next forward of a model's first block raise a device
out-of-memory error once (the sampler's relief path, without a GPU).

HTTP routes for the streaming tests (the suite has no GPU):
    POST /flux2local_test/stand_in {"vram": bytes, "pin_delay_s": s}: the CPU plays a GPU of that
        size (nodes/memory.py CpuStandIn) and page-locking is simulated (recorded, optionally slow);
    GET  /flux2local_test/memory: every holder (label, placed, its streamer's telemetry), the
        pinned-memory ledger and the simulated page locks.
"""

import dataclasses
import gc
import os
import sys
import threading
import time
from contextlib import contextmanager

import torch
from aiohttp import web
from comfy_api.latest import ComfyExtension, io
from server import PromptServer


class Flux2LocalTestToNativeConditioning(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="Flux2LocalTestToNativeConditioning",
            category="FLUX.2/testing",
            inputs=[
                io.Custom("FLUX2LOCAL_CONDITIONING").Input("conditioning"),
                io.Float.Input("guidance", default=4.0, min=0.0, max=100.0),
                io.Boolean.Input("negative", default=False),
            ],
            outputs=[io.Conditioning.Output()],
        )

    @classmethod
    def execute(cls, conditioning, guidance, negative) -> io.NodeOutput:
        embeds = conditioning.negative_embeds if negative else conditioning.prompt_embeds
        extra = {"pooled_output": None, "guidance": guidance}
        if conditioning.reference_latents:
            extra["reference_latents"] = list(conditioning.reference_latents)
        return io.NodeOutput([[embeds.float(), extra]])


class Flux2LocalTestTruncateFile(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="Flux2LocalTestTruncateFile",
            category="FLUX.2/testing",
            inputs=[
                io.Custom("FLUX2LOCAL_MODEL").Input("model"),
                io.String.Input("path"),
                io.Float.Input("fraction", default=0.5, min=0.0, max=1.0),
            ],
            outputs=[io.Custom("FLUX2LOCAL_MODEL").Output()],
        )

    @classmethod
    def execute(cls, model, path, fraction) -> io.NodeOutput:
        os.truncate(path, int(os.path.getsize(path) * fraction))
        return io.NodeOutput(model)


class Flux2LocalTestOutOfMemoryOnce(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="Flux2LocalTestOutOfMemoryOnce",
            category="FLUX.2/testing",
            inputs=[io.Custom("FLUX2LOCAL_MODEL").Input("model")],
            outputs=[io.Custom("FLUX2LOCAL_MODEL").Output()],
        )

    @classmethod
    def fingerprint_inputs(cls, **_):
        return time.time_ns()  # run every time: each prompt gets its one failure

    @classmethod
    def execute(cls, model) -> io.NodeOutput:
        module = model.module
        block = module.get_submodule(module.streamable_blocks[0])[0]

        def fail_once(_module, _args):
            handle.remove()
            _STATE["forced_ooms"] += 1
            raise torch.OutOfMemoryError("CUDA out of memory (simulated by the test bridge)")

        handle = block.register_forward_pre_hook(fail_once)
        return io.NodeOutput(model)


@contextmanager
def _tiny_qwen3_sizes(path):
    import comfy.sd
    import comfy.text_encoders.llama as llama
    from safetensors import safe_open

    with safe_open(path, "pt") as f:
        shape = {k: f.get_slice(k).get_shape() for k in f.keys()}
    vocab, hidden = shape["model.embed_tokens.weight"]
    head_dim = shape["model.layers.0.self_attn.q_norm.weight"][0]
    sizes = {
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": shape["model.layers.0.mlp.gate_proj.weight"][0],
        "num_hidden_layers": 1 + max(int(k.split(".")[2]) for k in shape if k.startswith("model.layers.")),
        "num_attention_heads": shape["model.layers.0.self_attn.q_proj.weight"][0] // head_dim,
        "num_key_value_heads": shape["model.layers.0.self_attn.k_proj.weight"][0] // head_dim,
    }
    base = llama.Qwen3_4BConfig
    tiny = dataclasses.make_dataclass(
        "TinyQwen3Config", [(k, int, v) for k, v in sizes.items()], bases=(base,)
    )
    tiny.head_dim = head_dim  # a class attribute in ComfyUI's config, not a field
    detect = comfy.sd.detect_te_model

    def detect_tiny(sd):
        if (
            sd.get("model.embed_tokens.weight") is not None
            and sd["model.embed_tokens.weight"].shape[1] == hidden
        ):
            return comfy.sd.TEModel.QWEN3_4B
        return detect(sd)

    llama.Qwen3_4BConfig, comfy.sd.detect_te_model = tiny, detect_tiny
    try:
        yield
    finally:
        llama.Qwen3_4BConfig, comfy.sd.detect_te_model = base, detect


class Flux2LocalTestTinyCLIPLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        import folder_paths

        return io.Schema(
            node_id="Flux2LocalTestTinyCLIPLoader",
            category="FLUX.2/testing",
            inputs=[io.Combo.Input("clip_name", options=folder_paths.get_filename_list("text_encoders"))],
            outputs=[io.Clip.Output()],
        )

    @classmethod
    def execute(cls, clip_name) -> io.NodeOutput:
        import folder_paths

        import nodes

        with _tiny_qwen3_sizes(folder_paths.get_full_path_or_raise("text_encoders", clip_name)):
            (clip,) = nodes.CLIPLoader().load_clip(clip_name, type="flux2")
        return io.NodeOutput(clip)


class _Extension(ComfyExtension):
    async def get_node_list(self):
        return [
            Flux2LocalTestToNativeConditioning,
            Flux2LocalTestTruncateFile,
            Flux2LocalTestOutOfMemoryOnce,
            Flux2LocalTestTinyCLIPLoader,
        ]


# ------------------------------------------------------------------------------- streaming on the CPU
_STATE = {"forced_ooms": 0, "pin_delay_s": 0.0}


class _FakePins:
    """Page-locking simulated (it needs CUDA): records each registered range; optionally slow."""

    def __init__(self):
        self.lock = threading.Lock()
        self.registered: dict[int, int] = {}
        self.calls = 0

    def register(self, t):
        time.sleep(_STATE["pin_delay_s"])
        with self.lock:
            self.calls += 1
            assert t.data_ptr() not in self.registered, "registered twice"
            self.registered[t.data_ptr()] = t.numel() * t.element_size()

    def unregister(self, t):
        with self.lock:
            assert self.registered.pop(t.data_ptr(), None) is not None, "unregistered memory never registered"


_PINS = _FakePins()


def _pack_module(suffix: str, attribute: str):
    """The pack's module named ``*<suffix>`` (its folder name is arbitrary)."""
    for name, mod in list(sys.modules.items()):
        if name.endswith(suffix) and mod is not None and hasattr(mod, attribute):
            return mod
    raise RuntimeError(f"Flux2Local's {suffix} is not loaded")


routes = PromptServer.instance.routes


@routes.post("/flux2local_test/stand_in")
async def stand_in(request):
    body = await request.json()
    memory = _pack_module(".nodes.memory", "CPU_STAND_IN")
    hostmem = _pack_module(".weight_streaming.hostmem", "LEDGER")
    memory.CPU_STAND_IN = memory.CpuStandIn(vram=int(body["vram"]))
    _STATE["pin_delay_s"] = float(body.get("pin_delay_s", 0.0))
    hostmem.register, hostmem.unregister = _PINS.register, _PINS.unregister
    return web.json_response({"ok": True})


@routes.get("/flux2local_test/memory")
async def memory_report(request):
    gc.collect()  # as ComfyUI's prompt worker does after dropping cached outputs
    memory = _pack_module(".nodes.memory", "CPU_STAND_IN")
    hostmem = _pack_module(".weight_streaming.hostmem", "LEDGER")
    holders = []
    for h in list(memory._HOLDERS):
        streamer = getattr(h, "streamer", None)
        holders.append(
            {
                "label": getattr(h, "label", type(h).__name__),
                "vram_budget_gb": getattr(getattr(h, "streaming", None), "vram_budget_gb", None),
                "placed": h.on_gpu,
                "streamer": None
                if streamer is None
                else dict(dataclasses.asdict(streamer.telemetry()), attached=streamer.attached),
            }
        )
    with _PINS.lock:
        pinned, calls = sum(_PINS.registered.values()), _PINS.calls
    return web.json_response(
        {
            "holders": holders,
            "ledger_used": hostmem.LEDGER.used,
            "fake_pinned": pinned,
            "register_calls": calls,
            "forced_ooms": _STATE["forced_ooms"],
        }
    )


async def comfy_entrypoint():
    return _Extension()
