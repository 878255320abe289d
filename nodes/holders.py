"""Holders that put a loaded module on the compute device for a run and give it back on request.

A holder is what our custom socket types carry (FLUX2LOCAL_MODEL, _TEXT_ENCODER, _VAE). Weights
are loaded on the offload device (CPU, memory-mapped where the file allows); ``prepare(device)``
places them through the holder's weight streamer: all of them when they fit in the budget (nothing
streamed), else resident blocks + paging from pinned RAM.

Either way the module keeps its streamer across offloads, and every weight (streamed, resident and
non-block) has a page-locked host buffer that its parameter points into between runs, filled in
parallel on the first placement. ComfyUI offloading the module (``detach(keep_pinned=True)``) only
drops the GPU copies: nothing is copied back to the host, host memory does not grow, and the next
``prepare`` re-plans for the new budget and work and places the weights again at pinned bandwidth
without pinning again (pinning [dev] takes tens of seconds; copying a 7 GiB model back and forth
through pageable memory took seconds per swap). The kept buffers stay within weight_streaming's
process-wide pinned limit, which takes them back when another model needs pinned memory (past the
limit weights are placed from where they were loaded); ComfyUI's "unload all" (POST /free, the
"Free model and node cache" button) and dropping the holder release them.

A transformer holder also carries a LoRA stack, applied (on the fly, beside the layers) each time it
prepares the module, so holders that share one loaded module can carry different stacks.
"""

from __future__ import annotations

import logging
import weakref
from dataclasses import dataclass

import torch
from torch import nn

from ..flux2_core.checkpoint import FileSet
from . import memory
from .progress import attach_progress

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
        self.streamer = None  # kept across offloads (detached, pinned buffers kept) once created
        self._release_on_drop: weakref.finalize | None = None
        self.total_bytes = module_bytes(module)
        self.loras: tuple = ()  # ((Flux2LoRA, strength), ...) applied by prepare()
        self.loras_applied = False  # some holder sharing this one's module applied a stack

    def check_files(self) -> None:
        """Raise a CheckpointError naming the file if one the module came from changed on disk."""
        if self.files is not None:
            self.files.check_unchanged(_CHANGED_FIX)

    def gpu_bytes(self) -> int:
        if not self.on_gpu:
            return 0
        if self.streamer is not None and self.streamer.attached:
            return self.streamer.plan.device_bytes
        return self.total_bytes

    @property
    def streams(self) -> bool:
        """True while some blocks are paged in from host memory (not everything kept on the device)."""
        s = self.streamer
        return s is not None and s.attached and bool(s.plan.streamed_indices)

    def run(self, fn, *args, **kwargs):
        """``fn(*args, **kwargs)`` on the prepared module; when it is streamed, through the streamer's
        ``call``: a device out-of-memory error lowers the resident blocks and runs ``fn`` again (it
        must be safe to repeat: a forward pass or an encode is)."""
        streamer = self.streamer
        if streamer is None or not streamer.attached or self.streaming is None:
            return fn(*args, **kwargs)  # a module that never streams: the error is the caller's
        return streamer.call(fn, *args, **kwargs)

    def guarded(self, module: nn.Module) -> OOMGuarded:
        """``module`` (what ``prepare`` returned) behind ``run``: each call of it is one guarded run."""
        return OOMGuarded(module, self)

    def release_kept_pinned(self) -> int:
        """Gives back the page-locked buffers kept for a quick re-attach; returns the bytes unpinned."""
        return self.streamer.release_pinned() if self.streamer is not None else 0

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
        if not memory.is_compute_device(device):
            return self.module
        if self.on_gpu and memory.same_device(self.device, device):
            if self._room_beside(device, activation_bytes):
                return self.module
            # E.g. a 4 MP run after a 1 MP one: plan again, for these activations.
            log.info(
                "Flux2Local: %s leaves too little room for this run's activations; placing it anew",
                self.label,
            )
        self.offload()
        budget = max(0, self._budget(device, activation_bytes) - lora_bytes)
        if self.streaming is None or self.total_bytes <= budget:
            memory.make_room(self.total_bytes + lora_bytes, device)
            self.place_resident(device)
        else:
            memory.make_room(budget, device)
            self._attach_streamer(device, budget, block_flops)
        return self.module

    def place_resident(self, device: torch.device) -> None:
        """All weights onto ``device`` (the caller made room), through page-locked host copies.

        The streamer with no budget limit: each block (and the non-block weights) is copied from its
        page-locked host buffer in one transfer, the buffers filled in parallel on the first placement
        (within the process-wide pinned limit) and kept across offloads; offloading points the
        weights back at them, so nothing is copied back and host memory does not grow.
        """
        from ..weight_streaming.config import UNLIMITED

        if self.on_gpu:
            self.offload()
        self._attach_streamer(device, UNLIMITED, None)

    def place_streamed(self, device: torch.device, budget: int) -> None:
        """Weights onto ``device`` within ``budget`` bytes through the (kept) streamer; the caller made room."""
        if self.on_gpu:
            self.offload()
        self._attach_streamer(device, budget, None)

    def _room_beside(self, device: torch.device, activation_bytes: int) -> bool:
        """Whether the weights as placed leave ``activation_bytes`` free (idle models give way first).

        Only asked with an "auto" weight budget: a budget the user set is kept as it is.
        """
        if self.streaming is None or self.streaming.vram_budget_gb > 0 or activation_bytes <= 0:
            return True

        def room() -> bool:
            return memory.free_vram(device) - memory.inference_reserve(device) >= activation_bytes

        if room():
            return True
        memory.make_room(activation_bytes, device)
        return room()

    def _budget(self, device: torch.device, activation_bytes: int) -> int:
        if self.streaming is not None and self.streaming.vram_budget_gb > 0:
            return int(self.streaming.vram_budget_gb * GIB)
        # Auto: ask ComfyUI to unload what it can first, then take what is left above its reserve
        # and the activations.
        memory.make_room(self.total_bytes + activation_bytes, device)
        return max(0, memory.vram_budget(device) - activation_bytes)

    def _streaming_config(self, device: torch.device, budget: int, block_flops: tuple[float, ...] | None):
        from ..weight_streaming import StreamingConfig

        cap = self.streaming.pinned_ram_gb if self.streaming is not None else 0
        pinned = int(cap * GIB) if cap > 0 else None
        return StreamingConfig.from_name(
            "auto",  # the user's budget and cap on top of the default prefetch and ring
            vram_budget=int(budget),
            pinned_cap=pinned,
            block_flops=tuple(block_flops) if block_flops else None,
            pin_memory=memory.pin_memory_setting(device),  # False under --disable-pinned-memory
            # Weights kept on the device get page-locked host copies too: placing them again after
            # an offload is then a DMA copy, and the offload itself copies nothing back.
            pin_resident=True,
        )

    def _attach_streamer(
        self, device: torch.device, budget: int, block_flops: tuple[float, ...] | None
    ) -> None:
        from ..weight_streaming import WeightStreamer

        config = self._streaming_config(device, budget, block_flops)
        streamer = self.streamer
        if streamer is not None and not memory.same_device(streamer.device, device):
            self._drop_streamer()  # another card: its kept buffers stay valid, but start afresh
            streamer = None
        if streamer is None:
            # The text encoder reads its streamed layers straight from the file into pinned memory.
            source = getattr(self.module, "weight_source", None)
            # A module without block lists (the VAE) is placed whole: nothing to stream.
            blocks = None if getattr(self.module, "streamable_blocks", None) else ()
            streamer = WeightStreamer(self.module, config, device, blocks=blocks, source=source)
            self.streamer = streamer
            # Dropping the holder (ComfyUI evicting the loader's output) unpins what it kept at once.
            self._release_on_drop = weakref.finalize(self, streamer.release_pinned)
        else:
            # The same streamer, re-planned for this run's budget and work; kept buffers are reused.
            streamer.config = config
        from ..weight_streaming.config import UNLIMITED

        if budget < UNLIMITED:
            log.info("Flux2Local: streaming %s with a %.2f GiB VRAM budget", self.label, budget / GIB)
        streamer.attach(progress=attach_progress(self.label))
        self.device = device
        self.on_stand_in = device.type == "cpu" and memory.CPU_STAND_IN is not None
        t = streamer.telemetry()
        log.info(
            "Flux2Local: %s placed in %.1f s (%d blocks kept on the device, %d streamed): %.2f GiB pinned "
            "again from before, %.2f GiB newly pinned",
            self.label,
            t.attach_seconds,
            t.resident_blocks,
            t.streamed_blocks,
            (t.reused_pinned_bytes + t.resident_reused_pinned_bytes) / GIB,
            (
                t.pinned_bytes
                + t.resident_pinned_bytes
                - t.reused_pinned_bytes
                - t.resident_reused_pinned_bytes
            )
            / GIB,
        )

    def _drop_streamer(self) -> None:
        """Forget the streamer, unpinning what it kept (the weights stay in host memory)."""
        if self._release_on_drop is not None:
            self._release_on_drop()  # release_pinned, once
            self._release_on_drop = None
        self.streamer = None

    def _offload(self) -> None:
        from ..flux2_core.lora import release_device_copies

        release_device_copies(self.module)  # the LoRA factors' GPU copies go with the weights
        if self.streamer is not None and self.streamer.attached:
            # VRAM back: the weights point at their host memory again (pinned copies kept), so
            # nothing is copied back and host memory does not grow.
            self.streamer.detach(keep_pinned=True)
        else:  # placed by someone else with .to() (not by this holder)
            self.module.to(memory.offload_device())


class OOMGuarded:
    """A prepared module whose calls go through its holder's ``run`` (out-of-memory relief).

    Attribute access reaches the module (``config``, ``streamable_blocks`` ...), so the sampler can
    use it wherever it takes the transformer.
    """

    def __init__(self, module: nn.Module, holder: ModuleHolder):
        self._module, self._holder = module, holder

    def __call__(self, *args, **kwargs):
        return self._holder.run(self._forward, *args, **kwargs)

    def _forward(self, *args, **kwargs):
        # A retried KV-variant pass that fills the reference cache must start from an empty cache:
        # the failed attempt may have filled part of it (and marked it filled).
        cache = kwargs.get("kv_cache")
        if cache is not None and kwargs.get("ref_img") is not None:
            cache.clear()
        return self._module(*args, **kwargs)

    def __getattr__(self, name: str):
        if name.startswith("__") or name in ("_module", "_holder"):
            raise AttributeError(name)
        return getattr(self._module, name)


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
            # Its pinned buffers hold the shared layers: ours take their place (never both pinned).
            self._generator.release_kept_pinned()
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
        self.encoder.release_kept_pinned()  # the shared layers are pinned for the generator instead
        return super().prepare(device, *args, **kwargs)


# What a FLUX2LOCAL_MODEL socket carries: the Model Loader's holder or a LoRA Loader's.
MODEL_HOLDERS = (ModuleHolder, LoRAModelHolder)
