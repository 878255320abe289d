"""FLUX.2 To Native MODEL: our loaded transformer as ComfyUI's MODEL, for every node that takes one.

A converter node rather than a second output of the Model Loader: it also takes FLUX.2 LoRA Loader's
output (our LoRA stack then rides along under native LoRA loaders), it builds ComfyUI's model object
only where a workflow asks for it, and the Model Loader's outputs stay as saved workflows know them.
"""

from __future__ import annotations

from comfy_api.latest import io

from .common import expect, user_errors
from .holders import MODEL_HOLDERS
from .types import CATEGORY, Flux2Model


class Flux2LocalToNativeModel(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="Flux2LocalToNativeModel",
            display_name="FLUX.2 To Native MODEL",
            category=CATEGORY,
            description="Hands our FLUX.2 model (fast loading, GGUF/FP8/NVFP4, weight streaming, our LoRAs) to "
            "ComfyUI's own nodes as a MODEL: KSampler, SamplerCustomAdvanced, LoRA loaders, EasyCache ... "
            "ComfyUI's memory manager then decides what stays on the GPU; the rest is streamed.",
            inputs=[
                Flux2Model.Input(
                    "model", tooltip="From FLUX.2 Model Loader or FLUX.2 LoRA Loader (its LoRAs come along)."
                ),
            ],
            outputs=[
                io.Model.Output(
                    display_name="MODEL",
                    tooltip="ComfyUI's FLUX.2 MODEL running this transformer; the same loaded weights (never "
                    "copied). Native LoRA loaders on it add their LoRAs beside the layers.",
                ),
            ],
        )

    @classmethod
    @user_errors
    def execute(cls, model) -> io.NodeOutput:
        from .native_patcher import native_model_for

        expect(
            "FLUX.2 To Native MODEL",
            "model",
            model,
            MODEL_HOLDERS,
            "a FLUX.2 Model Loader or LoRA Loader output",
        )
        return io.NodeOutput(native_model_for(model))
