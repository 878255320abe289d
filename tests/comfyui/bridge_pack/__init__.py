"""Test-only ComfyUI pack: hands Flux2Local's conditioning to ComfyUI's native FLUX.2 nodes.

The parity test runs the same prompt embeddings through our sampler and through native
BasicGuider + SamplerCustomAdvanced. ComfyUI's native CLIPLoader cannot load our tiny random text
encoders (it detects Mistral/Qwen3 by their real sizes), so both paths get the embeddings that
FLUX.2 Encode Prompt produced, converted here into a native CONDITIONING. Linked into custom_nodes
by tests/comfyui/conftest.py only; never shipped.

Flux2LocalTestTruncateFile truncates a file between two nodes of one prompt (after the loader ran,
before the sampler uses the model), which no HTTP request can time reliably.
"""

import os

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


class _Extension(ComfyExtension):
    async def get_node_list(self):
        return [Flux2LocalTestToNativeConditioning, Flux2LocalTestTruncateFile]


async def comfy_entrypoint():
    return _Extension()
