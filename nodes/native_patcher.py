"""The ModelPatcher of a Flux2Local native MODEL: ComfyUI's memory manager decides, our streamer obeys.

ComfyUI (comfy/model_management.py) loads a MODEL with ``LoadedModel.model_load`` ->
``patcher.partially_load(device, extra_bytes)`` (1e32 = everything), frees VRAM with
``partially_unload(offload, bytes)`` or ``detach()``, and plans with ``model_size()`` and
``loaded_size()``. ComfyUI's own patcher moves or casts single weights; here the same calls place the
whole transformer through the holder's weight streamer: fully on the device when the budget holds it
(from page-locked host copies, so unloading copies nothing back), else with that budget (resident
blocks + ring, the rest paged from pinned RAM), re-planned when ComfyUI grants or takes back memory. ``loaded_size()`` reads where the weights really are (the holder's state), so a
FLUX.2 node or our memory hook moving them is seen at once. Clones share the loaded module (ComfyUI's
clones share ``self.model``); each clone carries its own LoRA stack (our FLUX.2 LoRA Loader's, then
ComfyUI's LoRA patches converted by ``native_lora``), applied beside the layers when it runs, so a
LoRA change never moves or rebuilds a weight.
"""

from __future__ import annotations

import dataclasses
import logging
from collections import OrderedDict

import comfy.model_patcher
import torch

from ..flux2_core.lora import apply_loras, release_device_copies
from . import memory
from .native_lora import lora_from_patches

log = logging.getLogger(__name__)

GIB = 1024**3
# ComfyUI asks for "all of it" with 1e32 extra bytes (LoadedModel.model_load).
_CACHED_PATCH_LORAS = 8


class Flux2LocalModelPatcher(comfy.model_patcher.ModelPatcher):
    """ComfyUI's ModelPatcher for a ``comfy.model_base.Flux2`` built by ``native_model``.

    ``self.model.flux2_holder`` is the transformer's ``ModuleHolder`` (shared by every clone and by
    the FLUX.2 nodes); ``self.flux2_loras`` the (Flux2LoRA, strength) stack of our LoRA nodes.
    """

    def __init__(self, model, load_device, offload_device, size=0, weight_inplace_update=False):
        super().__init__(model, load_device, offload_device, size, weight_inplace_update)
        self.flux2_loras: tuple = ()

    @property
    def flux2_holder(self):
        return self.model.flux2_holder

    def clone(self):
        n = super().clone()
        n.flux2_loras = self.flux2_loras
        return n

    def is_dynamic(self) -> bool:
        return False

    # ------------------------------------------------------------------ what is where
    def _streamer(self):
        """The holder's streamer while it pages blocks (a model placed whole is not "streamed")."""
        h = self.flux2_holder
        return h.streamer if h.streams else None

    def loaded_size(self) -> int:
        """Bytes of weights (and LoRA factors) on the compute device now."""
        h = self.flux2_holder
        extra = getattr(self.model, "flux2_lora_bytes", 0)
        s = self._streamer()
        if s is not None:
            return s.plan.device_bytes + extra
        if h.on_gpu:
            return self.model_size() + extra
        # A CPU compute device: the weights are used where they are ("loaded" once ComfyUI loaded them).
        return self.model.model_loaded_weight_memory if self.load_device.type == "cpu" else 0

    def _sync(self) -> None:
        """Mirrors the placement into the fields ComfyUI's code reads off the model."""
        placed = self._streamer() is not None or self.flux2_holder.on_gpu
        self.model.model_lowvram = self._streamer() is not None
        self.model.device = self.flux2_holder.device if placed else self.offload_device
        self.model.model_loaded_weight_memory = self.loaded_size()
        self.model.model_offload_buffer_memory = 0
        self.model.current_weight_patches_uuid = self.patches_uuid

    # ------------------------------------------------------------------ LoRAs
    def _patch_lora(self):
        if not self.patches:
            return None
        cache = self.model.__dict__.setdefault("flux2_patch_loras", OrderedDict())
        if self.patches_uuid not in cache:
            cache[self.patches_uuid] = lora_from_patches(self.patches, self.flux2_holder.module)
            while len(cache) > _CACHED_PATCH_LORAS:
                cache.popitem(last=False)
        cache.move_to_end(self.patches_uuid)
        return cache[self.patches_uuid]

    def _stack(self) -> tuple:
        stack = list(self.flux2_loras)
        lora = self._patch_lora()
        if lora is not None:
            stack.append((lora, 1.0))
        return tuple(stack)

    def _apply_stack(self) -> None:
        h, stack = self.flux2_holder, self._stack()
        if stack or h.loras_applied:
            apply_loras(h.module, stack)  # the stack already applied costs nothing
            h.loras_applied = bool(stack)
        self.model.flux2_lora_bytes = sum(lora.nbytes() for lora, s in stack if s) if h.on_gpu else 0

    def pre_run(self):
        # Clones share the module: the clone about to sample sets its own stack.
        self._apply_stack()
        super().pre_run()

    # ------------------------------------------------------------------ placement
    def _release(self) -> None:
        """All weights back on the offload device (the holder's offload: GPU copies dropped, pinned
        host copies kept; a streamer on a CPU compute device is detached and dropped)."""
        h = self.flux2_holder
        if h.on_gpu:
            h.offload()
        elif h.streamer is not None:  # streamed onto a CPU compute device (tests)
            release_device_copies(h.module)
            h.streamer.detach()
            h.streamer = None
        self.model.model_loaded_weight_memory = 0
        self.model.flux2_lora_bytes = 0

    def _budget(self, budget: int | None) -> int | None:
        """ComfyUI's budget capped by the Model Loader's vram_budget_gb, minus the LoRA factors."""
        h = self.flux2_holder
        user = h.streaming.vram_budget_gb if h.streaming is not None else 0
        if user > 0:
            budget = int(user * GIB) if budget is None else min(budget, int(user * GIB))
        if budget is None:
            return None
        return max(0, budget - sum(lora.nbytes() for lora, s in self._stack() if s))

    def _place(self, device: torch.device, budget: int | None) -> None:
        """Weights on ``device`` within ``budget`` bytes (None: all of them)."""
        h = self.flux2_holder
        h.check_files()
        budget = self._budget(budget)
        if budget is None or budget >= h.total_bytes:
            if device.type == "cpu":
                if self._streamer() is not None:
                    self._release()
                self.model.model_loaded_weight_memory = self.model_size()
                return
            if h.on_gpu and self._streamer() is None and memory.same_device(h.device, device):
                return
            self._release()
            log.info("Flux2Local: loading %s fully onto %s (ComfyUI's memory manager)", h.label, device)
            h.place_resident(device)  # from page-locked copies; unloading copies nothing back
            return
        s = self._streamer()
        if s is not None and memory.same_device(s.device, device):
            plan = s.plan
            step = min((plan.block_sizes[i] for i in plan.streamed_indices), default=0)
            if plan.device_bytes <= budget < plan.device_bytes + max(step, 1):
                return  # this plan is what the budget allows: keep it
            s.detach(keep_pinned=True)  # re-plan, reusing the pinned copies of streamed blocks
            s.config = dataclasses.replace(s.config, vram_budget=int(budget))
            s.attach()
            log.info(
                "Flux2Local: %s re-planned for %.2f GiB: %s", h.label, budget / GIB, s.telemetry().summary()
            )
            return
        self._release()
        self._attach(device, budget)

    def _attach(self, device: torch.device, budget: int) -> None:
        h = self.flux2_holder
        h.place_streamed(device, int(budget))  # the holder's kept streamer: its pinned copies reused
        log.info(
            "Flux2Local: streaming %s within ComfyUI's %.2f GiB: %s",
            h.label,
            budget / GIB,
            h.streamer.telemetry().summary(),
        )

    # ------------------------------------------------------------------ ComfyUI's entry points
    def load(self, device_to=None, lowvram_model_memory=0, force_patch_weights=False, full_load=False):
        if self.weight_wrapper_patches:
            from ..flux2_core.errors import InputError

            raise InputError(
                "weight wrappers are not supported by a Flux2Local model (it never rebuilds weights)."
            )
        device = torch.device(device_to) if device_to is not None else self.load_device
        full = full_load or not lowvram_model_memory or lowvram_model_memory >= self.model_size()
        with self.use_ejected():
            self._place(device, None if full else int(lowvram_model_memory))
            self._apply_stack()
            self._sync()

    def partially_load(self, device_to, extra_memory=0, force_patch_weights=False):
        with self.use_ejected(skip_and_inject_on_exit_only=True):
            # Object patches (e.g. ModelSamplingFlux's model_sampling) are restored and set again, as
            # ComfyUI's own patcher does on every load; weights only move if the budget changed.
            self.unpatch_model(self.offload_device, unpatch_weights=False)
            self.patch_model(load_weights=False)
            device = torch.device(device_to)
            used = self.loaded_size() if memory.same_device(self.model.device, device) else 0
            if extra_memory < 0:
                self.partially_unload(self.offload_device, -extra_memory)
                return 0
            target = used + extra_memory
            self._place(device, None if target >= self.model_size() else int(target))
            self._apply_stack()
            self._sync()
            return self.loaded_size() - used

    def partially_unload(self, device_to, memory_to_free=0, force_patch_weights=False):
        with self.use_ejected():
            used = self.loaded_size()
            h = self.flux2_holder
            placed = self._streamer() is not None or h.on_gpu
            if not placed:
                self._release()
                self._sync()
                return used
            target = used - int(memory_to_free)
            if target > 0:
                self._place(h.device, target)
            if target <= 0 or self.loaded_size() > target:  # the smallest plan does not fit: unload all
                self._release()
            self._sync()
            freed = used - self.loaded_size()
            log.info("Flux2Local: gave back %.2f GiB of %s to ComfyUI", freed / GIB, h.label)
            return freed

    def unpatch_model(self, device_to=None, unpatch_weights=True):
        if unpatch_weights:
            self._release()
        super().unpatch_model(device_to, unpatch_weights)
        if unpatch_weights:
            self._sync()
            self.model.current_weight_patches_uuid = None

    def patch_hooks(self, hooks):
        if hooks is not None and any(getattr(h, "weights", None) for h in getattr(hooks, "hooks", ())):
            from ..flux2_core.errors import InputError

            raise InputError(
                "hook LoRAs (Create Hook LoRA / scheduled weights) are not supported by a Flux2Local model; "
                "use FLUX.2 LoRA Loader or LoraLoaderModelOnly."
            )
        return super().patch_hooks(hooks)


def native_model_for(holder) -> Flux2LocalModelPatcher:
    """The native MODEL of a FLUX2LOCAL_MODEL (a Model Loader's or LoRA Loader's holder).

    One ``comfy.model_base.Flux2`` exists per loaded transformer: every conversion returns a clone of
    the same root patcher, so ComfyUI sees one model (``is_clone``) however many nodes convert it,
    and never counts or loads the same weights twice. The LoRA Loader's stack goes with the clone.
    """
    import comfy.model_management as mm

    from .native_model import build_native_model

    base = getattr(holder, "base", holder)  # a LoRAModelHolder shares its base's module
    root = base.__dict__.get("_flux2local_native")
    if root is None:
        model = build_native_model(base)
        root = Flux2LocalModelPatcher(
            model, mm.get_torch_device(), mm.unet_offload_device(), size=mm.module_size(model)
        )
        base.__dict__["_flux2local_native"] = root
    patcher = root.clone()
    patcher.flux2_loras = tuple(getattr(holder, "loras", ()))
    return patcher
