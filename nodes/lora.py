"""FLUX.2 LoRA Loader: adds a LoRA (from ComfyUI's models/loras) to a FLUX.2 model's LoRA stack."""

from __future__ import annotations

import logging
import os
from collections import OrderedDict

import folder_paths
from comfy_api.latest import io

from .common import expect, resolve_model_path, user_errors
from .holders import MODEL_HOLDERS
from .types import CATEGORY, Flux2Model

log = logging.getLogger(__name__)

# Loaded LoRAs by (path, size, mtime): re-running with another strength reads nothing again. The
# tensors are views of the memory-mapped file, so an entry costs little RAM until applied.
_CACHE: OrderedDict[tuple, object] = OrderedDict()
_CACHE_SIZE = 16


def _load(path: str):
    from ..flux2_core import load_lora

    st = os.stat(path)
    key = (os.path.realpath(path), st.st_size, st.st_mtime_ns)
    lora = _CACHE.get(key)
    if lora is None:
        lora = _CACHE[key] = load_lora(path)
        while len(_CACHE) > _CACHE_SIZE:
            _CACHE.popitem(last=False)
    _CACHE.move_to_end(key)
    return lora


class Flux2LocalLoRALoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="Flux2LocalLoRALoader",
            display_name="FLUX.2 LoRA Loader",
            category=CATEGORY,
            description="Adds a FLUX.2 LoRA to the model without rebuilding any weight: applied beside each "
            "layer, so it works with streamed and FP8 weights. Chain several for a stack.",
            inputs=[
                Flux2Model.Input(
                    "model",
                    tooltip="From FLUX.2 Model Loader or another FLUX.2 LoRA Loader (LoRAs stack).",
                ),
                io.Combo.Input(
                    "lora_name",
                    options=folder_paths.get_filename_list("loras"),
                    tooltip="A FLUX.2 LoRA in models/loras, trained for this model's size ([dev], [klein] 4B "
                    "or 9B). ai-toolkit, kohya/musubi, diffusers/PEFT, OneTrainer, LyCORIS LoKr/LoHa files "
                    "all work; FLUX.1 and SDXL LoRAs are refused with a message.",
                ),
                io.Float.Input(
                    "strength",
                    default=1.0,
                    min=-100.0,
                    max=100.0,
                    step=0.01,
                    tooltip="How strongly the LoRA changes the model: 1 = as trained, 0 = off, negative "
                    "values push the other way. Changing it needs no reload.",
                ),
            ],
            outputs=[
                Flux2Model.Output(
                    display_name="model",
                    tooltip="The same loaded model with this LoRA added to its stack, for FLUX.2 Sampler.",
                ),
            ],
        )

    @classmethod
    @user_errors
    def execute(cls, model, lora_name, strength) -> io.NodeOutput:
        from ..flux2_core.lora import check_lora_fits

        expect(
            "FLUX.2 LoRA Loader", "model", model, MODEL_HOLDERS, "a FLUX.2 Model Loader or LoRA Loader output"
        )
        lora = _load(resolve_model_path("loras", lora_name))
        check_lora_fits(model.module, lora)  # a LoRA for another model fails here, not in the sampler
        log.info(
            "Flux2Local: LoRA %s (%s, %d layers) at strength %g",
            lora.name,
            lora.format,
            len(lora.layers),
            strength,
        )
        return io.NodeOutput(model.with_loras([(lora, float(strength))]))
