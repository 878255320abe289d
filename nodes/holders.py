"""Holders that put a loaded module on the compute device for a run and give it back on request.

A holder is what our custom socket types carry (FLUX2LOCAL_MODEL, _TEXT_ENCODER, _VAE). Weights
are loaded on the offload device (CPU, memory-mapped where the file allows); ``prepare(device)``
moves them fully to the GPU when they fit in the budget, or attaches the weight streamer (resident
blocks + paging from pinned RAM) when they do not.

A transformer holder also carries a LoRA stack, applied (on the fly, beside the layers) each time it
prepares the module, so holders that share one loaded module can carry different stacks.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

from ..flux2_core.checkpoint import FileSet
from . import memory

log = logging.getLogger(__name__)

GIB = 1024**3


@dataclass(frozen=True)
class StreamingSettings:
    """The user's streaming choices from the Model Loader.

    Attributes:
        vram_budget_gb: weights budget on the GPU in GiB; 0 = auto (free VRAM minus ComfyUI's reserve).
        pinned_ram_gb: cap on pinned host RAM in GiB for paged blocks; 0 = auto.
    """

    vram_budget_gb: float = 0.0
    pinned_ram_gb: float = 0.0


def module_bytes(module: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])


# What to do when a loaded file changed: the loaders' fingerprints make ComfyUI reload it.
_CHANGED_FIX = (
    "Queue the prompt again: the loader node reloads a file that changed (or says what is wrong with it)."
)


class ModuleHolder(memory.GpuHolder):
    """One loaded module (transformer, text encoder or VAE) plus where its weights are now.

    Args:
        module: the loaded module.
        label: how log lines name it.
        streaming: the user's streaming settings; None never streams.
        source: the file or folder it was loaded from, for messages.
        files: the files the module was loaded from (``loading()``), checked before every use: a
            module loaded in its stored dtype views the memory-mapped file, and using it after the
            file was truncated would crash ComfyUI (SIGBUS), after a rewrite use other weights.
    """

    def __init__(
        self,
        module: nn.Module,
        label: str,
        streaming: StreamingSettings | None = None,
        source: str = "",
        files: FileSet | None = None,
    ):
        super().__init__()
        self.module = module
        self.label = label
        self.streaming = streaming
        self.source = source
        self.files = files
        self.streamer = None
        self.total_bytes = module_bytes(module)
        self.loras: tuple = ()  # ((Flux2LoRA, strength), ...) applied by prepare()
        self.loras_applied = False  # some holder sharing this one's module applied a stack

    def check_files(self) -> None:
        """Raise a CheckpointError naming the file if one the module came from changed on disk."""
        if self.files is not None:
            self.files.check_unchanged(_CHANGED_FIX)

    def gpu_bytes(self) -> int:
        return self.total_bytes if self.on_gpu else 0

    def prepare(
        self, device: torch.device, activation_bytes: int = 0, block_flops: tuple[float, ...] | None = None
    ) -> nn.Module:
        """Returns the module ready to run on ``device`` (moving or streaming weights as needed).

        Args:
            device: the compute device; on the CPU nothing moves.
            activation_bytes: the caller's estimate of the run's activation peak, kept free on top of
                ComfyUI's inference reserve when the weight budget is "auto".
            block_flops: FLOPs of each streamable block for this run (execution order). With them the
                streamer plans from estimated compute times (which blocks to keep so copies hide behind
                compute) instead of bytes alone; no resident run is needed to measure them.
        """
        return self._prepare(device, activation_bytes, block_flops, self.loras)

    def with_loras(self, loras) -> LoRAModelHolder:
        """A holder of the same loaded module with ``loras`` ((Flux2LoRA, strength) pairs) added."""
        return LoRAModelHolder(self, tuple(loras))

    def _prepare(self, device, activation_bytes, block_flops, loras) -> nn.Module:
        self.check_files()
        # The LoRA factors live on the GPU beside the weights: keep room for them in the budget.
        lora_bytes = sum(lora.nbytes() for lora, s in loras if s)
        module = self._place(device, activation_bytes, block_flops, lora_bytes)
        if loras or self.loras_applied:
            from ..flux2_core.lora import apply_loras

            # Whoever prepares the module sets its stack; applying the stack already applied is free.
            apply_loras(module, loras)
            self.loras_applied = bool(loras)
        return module

    def _place(self, device, activation_bytes, block_flops, lora_bytes=0) -> nn.Module:
        if device.type == "cpu" or (self.on_gpu and memory.same_device(self.device, device)):
            return self.module
        self.offload()
        budget = max(0, self._budget(device, activation_bytes) - lora_bytes)
        if self.streaming is None or self.total_bytes <= budget:
            memory.make_room(self.total_bytes + lora_bytes, device)
            self.module.to(device)
        else:
            self._attach_streamer(device, budget, block_flops)
        self.device = device
        return self.module

    def _budget(self, device: torch.device, activation_bytes: int) -> int:
        if self.streaming is not None and self.streaming.vram_budget_gb > 0:
            return int(self.streaming.vram_budget_gb * GIB)
        # Auto: ask ComfyUI to unload what it can first, then take what is left above its reserve
        # and the activations.
        memory.make_room(self.total_bytes + activation_bytes, device)
        return max(0, memory.vram_budget(device) - activation_bytes)

    def _attach_streamer(
        self, device: torch.device, budget: int, block_flops: tuple[float, ...] | None
    ) -> None:
        from ..weight_streaming import StreamingConfig, WeightStreamer

        memory.make_room(budget, device)
        pinned = int(self.streaming.pinned_ram_gb * GIB) if self.streaming.pinned_ram_gb > 0 else None
        config = StreamingConfig.from_name(
            "auto",  # the user's budget and cap on top of the default prefetch and ring
            vram_budget=int(budget),
            pinned_cap=pinned,
            block_flops=tuple(block_flops) if block_flops else None,
        )
        log.info("Flux2Local: streaming %s with a %.2f GiB VRAM budget", self.label, budget / GIB)
        self.streamer = WeightStreamer(self.module, config, device)
        self.streamer.attach()

    def _offload(self) -> None:
        from ..flux2_core.lora import release_device_copies

        release_device_copies(self.module)  # the LoRA factors' GPU copies go with the weights
        if self.streamer is not None:
            self.streamer.detach()
            self.streamer = None
        else:
            self.module.to(memory.offload_device())


class LoRAModelHolder:
    """What FLUX.2 LoRA Loader outputs: the input holder's loaded module and device state (shared,
    never copied) plus a LoRA stack, applied when this holder prepares the module for a run.

    ComfyUI caches node outputs, so the input holder is never changed: each LoRA node returns a new
    one of these; chaining appends to the stack.
    """

    def __init__(self, base: ModuleHolder, loras: tuple):
        self.base = base
        self.loras = loras

    def prepare(
        self, device: torch.device, activation_bytes: int = 0, block_flops: tuple[float, ...] | None = None
    ) -> nn.Module:
        """Like ``ModuleHolder.prepare``, with this holder's LoRA stack applied."""
        return self.base._prepare(device, activation_bytes, block_flops, self.loras)

    def with_loras(self, loras) -> LoRAModelHolder:
        return LoRAModelHolder(self.base, self.loras + tuple(loras))

    def __getattr__(self, name: str):
        # module, using(), streamer, offload(), label ...: the shared holder's. Dunder and "base"
        # lookups (copy, pickle, before __init__) must not recurse.
        if name == "base" or name.startswith("__"):
            raise AttributeError(name)
        return getattr(self.base, name)


class TextEncoderHolder(ModuleHolder):
    """The text encoder, plus the text generator (prompt upsampling) built on its first use.

    The generator shares the encoder's decoder layers, so the two are never on the GPU together:
    preparing one gives the other's VRAM back first.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._generator: GeneratorHolder | None = None

    def generator(self) -> GeneratorHolder:
        """The holder of the encoder's ``TextGenerator``, loading its extra parts on first use."""
        if self._generator is None:
            self.check_files()
            self._generator = GeneratorHolder(self)
        return self._generator

    def prepare(self, device: torch.device, *args, **kwargs) -> nn.Module:
        if self._generator is not None:
            self._generator.offload()
        return super().prepare(device, *args, **kwargs)


class GeneratorHolder(ModuleHolder):
    """The ``TextGenerator`` of a ``TextEncoderHolder`` (same files, same streaming settings)."""

    def __init__(self, encoder: TextEncoderHolder):
        generator = encoder.module.generator()
        super().__init__(
            generator,
            f"{encoder.label} generator",
            encoder.streaming,
            source=encoder.source,
            files=encoder.files,
        )
        self.encoder = encoder

    def prepare(self, device: torch.device, *args, **kwargs) -> nn.Module:
        self.encoder.offload()
        return super().prepare(device, *args, **kwargs)


# What a FLUX2LOCAL_MODEL socket carries: the Model Loader's holder or a LoRA Loader's.
MODEL_HOLDERS = (ModuleHolder, LoRAModelHolder)
