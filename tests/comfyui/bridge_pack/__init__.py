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
"""

import dataclasses
import os
from contextlib import contextmanager

from comfy_api.latest import ComfyExtension, io


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
        return [Flux2LocalTestToNativeConditioning, Flux2LocalTestTruncateFile, Flux2LocalTestTinyCLIPLoader]


async def comfy_entrypoint():
    return _Extension()
