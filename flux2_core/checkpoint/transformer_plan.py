"""Where each BFL tensor of a FLUX.2 transformer comes from in a checkpoint, in any layout.

A ``TransformerPlan`` maps every BFL name to a ``TensorSource`` (one stored tensor, the thirds of a
diffusers qkv, a swapped final layer, an fp8 weight with its scales, NVFP4 data, or a GGUF tensor),
plus the detected layout name and the logical (dequantized) shapes used to infer the config.
The layout is chosen through ``LAYOUTS`` (a table of test -> source builder).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import torch

from ..config import is_block_linear
from ..errors import CheckpointError
from .gguf_file import GGUFFile
from .identify import FLUX2_TRANSFORMER, identify, wrong_model
from .keys import strip_prefix
from .layouts import SWAPPED, diffusers_key_map, is_flux2_diffusers
from .reader import CheckpointReader

FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
_STORAGE_NAMES = {
    torch.bfloat16: "BF16",
    torch.float16: "F16",
    torch.float32: "F32",
    torch.float8_e4m3fn: "FP8_E4M3",
    torch.float8_e5m2: "FP8_E5M2",
}
_AUX_SUFFIXES = (
    ".weight_scale_2",
    ".weight_scale",
    ".input_scale",
    ".scale_weight",
    ".scale_input",
    ".comfy_quant",
)


@dataclass(frozen=True)
class TensorSource:
    """How to build one BFL tensor.

    kind: "plain" (``keys[0]``), "cat" (dim-0 concatenation of ``keys``), "swap" (halves of
    ``keys[0]`` swapped), "fp8" (``keys[0]`` float8, ``scale``/``input_scale`` optional),
    "nvfp4" (``keys[0]`` packed, ``scale`` block scales, ``scale2`` global scale, ``input_scale``
    optional), "gguf" (``keys[0]`` in a GGUF file, any GGML type).
    shape: the logical (dequantized) shape in PyTorch order.
    storage: how the file stores it, for summaries: "BF16", "F32", "FP8_E4M3", "NVFP4", "Q4_K", ...
    """

    kind: str
    keys: tuple[str, ...]
    shape: tuple[int, ...]
    scale: str | None = None
    scale2: str | None = None
    input_scale: str | None = None
    storage: str = ""


@dataclass
class TransformerPlan:
    sources: dict[str, TensorSource]
    checkpoint_format: str
    unexpected: list[str] = field(default_factory=list)

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: s.shape for k, s in self.sources.items()}


def _quant_formats(reader: CheckpointReader, prefix: str, layers: list[str]) -> dict[str, str]:
    """Per-layer quant format from ``comfy_quant`` tensors or the ``_quantization_metadata`` header."""
    out: dict[str, str] = {}
    raw = reader.metadata.get("_quantization_metadata")
    if raw:
        try:
            for name, conf in json.loads(raw).get("layers", {}).items():
                out[name[len(prefix) :] if prefix and name.startswith(prefix) else name] = conf.get(
                    "format", ""
                )
        except (ValueError, AttributeError):
            raise CheckpointError(
                reader.path,
                "its '_quantization_metadata' header is not valid JSON.",
                "Download the file again.",
            ) from None
    for layer in layers:
        key = f"{prefix}{layer}.comfy_quant"
        if key in reader:
            try:
                out[layer] = json.loads(bytes(reader.get(key).tolist()).decode()).get("format", "")
            except (ValueError, UnicodeDecodeError):
                raise CheckpointError(
                    reader.path, f"'{key}' is not valid quantization JSON.", "Download the file again."
                ) from None
    return out


def _bfl_sources(reader: CheckpointReader, prefix: str, keys: list[str]) -> TransformerPlan:
    key_set = set(keys)
    main = [k for k in keys if not k.endswith(_AUX_SUFFIXES) and k != "scaled_fp8"]
    layers = [k[: -len(".weight")] for k in main if k.endswith(".weight")]
    formats = _quant_formats(reader, prefix, layers)
    sources: dict[str, TensorSource] = {}
    used: set[str] = set(main) | ({"scaled_fp8"} & key_set)
    any_fp8 = any_nvfp4 = False
    for k in main:
        full = prefix + k
        dt, shape = reader.dtype(full), reader.shape(full)
        layer = k[: -len(".weight")] if k.endswith(".weight") else None

        def aux(*names: str, layer: str | None = layer) -> str | None:
            for n in names:
                if layer is not None and f"{layer}{n}" in key_set:
                    used.add(f"{layer}{n}")
                    return prefix + f"{layer}{n}"
            return None

        if layer is not None and layer + ".comfy_quant" in key_set:
            used.add(layer + ".comfy_quant")
        fmt = formats.get(layer or "", "")
        if dt in FP8_DTYPES:
            any_fp8 = True
            sources[k] = TensorSource(
                "fp8",
                (full,),
                shape,
                scale=aux(".weight_scale", ".scale_weight"),
                input_scale=aux(".input_scale", ".scale_input"),
                storage=_STORAGE_NAMES[dt],
            )
        elif dt == torch.uint8 and (
            fmt == "nvfp4" or (layer is not None and layer + ".weight_scale_2" in key_set)
        ):
            any_nvfp4 = True
            block, glob = aux(".weight_scale"), aux(".weight_scale_2")
            if block is None or glob is None or len(shape) != 2:
                raise CheckpointError(
                    reader.path,
                    f"NVFP4 layer '{layer}' lacks its weight_scale / weight_scale_2.",
                    "Download the file again; it is incomplete.",
                )
            sources[k] = TensorSource(
                "nvfp4",
                (full,),
                (shape[0], shape[1] * 2),
                scale=block,
                scale2=glob,
                input_scale=aux(".input_scale"),  # activation scale of FP4 matmuls
                storage="NVFP4",
            )
        elif dt == torch.uint8 or fmt:
            raise CheckpointError(
                reader.path,
                f"tensor '{full}' uses an unsupported quantization ({fmt or 'uint8 without scales'}).",
                "Use a bf16, fp8 or NVFP4 FLUX.2 file.",
            )
        else:
            sources[k] = TensorSource("plain", (full,), shape, storage=_STORAGE_NAMES.get(dt, str(dt)))
    comfy_style = bool(prefix) or "scaled_fp8" in key_set or any(k.endswith(".comfy_quant") for k in keys)
    if any_nvfp4:
        fmt_name = "nvfp4"
    elif any_fp8:
        fmt_name = "comfy-fp8" if comfy_style else "bfl-fp8"
    else:
        fmt_name = "comfyui" if prefix else "bfl"
    return TransformerPlan(sources, fmt_name, sorted(prefix + k for k in key_set - used))


def _diffusers_sources(reader: CheckpointReader, keys: list[str]) -> TransformerPlan:
    mapping = diffusers_key_map(keys)
    sources: dict[str, TensorSource] = {}
    used: set[str] = set()
    for bfl, src in mapping.items():
        if isinstance(src, tuple):
            missing = [s for s in src if s not in reader]
            if missing:
                raise CheckpointError(
                    reader.path,
                    f"is missing {missing} (parts of '{bfl}').",
                    "Download every shard of the diffusers transformer.",
                )
            shapes = [reader.shape(s) for s in src]
            storage = _STORAGE_NAMES.get(reader.dtype(src[0]), "")
            sources[bfl] = TensorSource(
                "cat", src, (sum(s[0] for s in shapes), *shapes[0][1:]), storage=storage
            )
            used.update(src)
        elif src in reader:
            storage = _STORAGE_NAMES.get(reader.dtype(src), "")
            kind = "swap" if bfl in SWAPPED else "plain"
            sources[bfl] = TensorSource(kind, (src,), reader.shape(src), storage=storage)
            used.add(src)
        else:
            continue  # reported as a missing key by the loader
        if reader.dtype(sources[bfl].keys[0]) in (*FP8_DTYPES, torch.uint8):
            raise CheckpointError(
                reader.path,
                "quantized diffusers folders are not supported.",
                "Use the bf16 diffusers folder or a BFL/ComfyUI fp8 single file.",
            )
    return TransformerPlan(sources, "diffusers", sorted(set(keys) - used))


def _gguf_sources(reader: GGUFFile, prefix: str, keys: list[str]) -> TransformerPlan:
    """A GGUF of BFL-named tensors (as the FLUX converters write them): one source per tensor."""
    sources: dict[str, TensorSource] = {}
    for k in keys:
        full = prefix + k
        reader.ggml(full)  # an unsupported type fails here, naming the type, the tensor and the file
        sources[k] = TensorSource("gguf", (full,), reader.shape(full), storage=reader.storage(full))
    return TransformerPlan(sources, "gguf")


# (layout test on (reader, stripped keys), source builder). First match wins.
LAYOUTS = (
    (lambda r, ks: isinstance(r, GGUFFile), lambda r, p, ks: _gguf_sources(r, p, ks)),
    (lambda r, ks: is_flux2_diffusers(set(ks)), lambda r, p, ks: _diffusers_sources(r, ks)),
    (lambda r, ks: True, lambda r, p, ks: _bfl_sources(r, p, ks)),
)

_PICK = "Pick a FLUX.2 [dev] or [klein] transformer file (flux2-dev*, flux-2-klein-*, .safetensors or .gguf)."


def plan_transformer(reader: CheckpointReader | GGUFFile) -> TransformerPlan:
    """Recognise the layout of ``reader`` and map every BFL tensor name to its source.

    Raises:
        CheckpointError: the checkpoint is not a FLUX.2 transformer (naming what it is, when known).
    """
    raw = reader.keys()
    arch = reader.architecture if isinstance(reader, GGUFFile) else None
    kind = identify(raw, reader.shape, arch)
    if kind is None or kind.key != FLUX2_TRANSFORMER:
        hint = (
            "no 'double_stream_modulation_img.lin.weight' or diffusers 'x_embedder.weight' key; "
            f"first keys: {sorted(raw)[:5]}" + (f"; GGUF architecture '{arch}'" if arch else "")
        )
        raise wrong_model(reader.path, kind, "a FLUX.2 transformer", _PICK, hint)
    prefix, keys = strip_prefix(raw)
    build = next(b for test, b in LAYOUTS if test(reader, keys))
    return build(reader, prefix, keys)


def fp8_block_layers(plan: TransformerPlan) -> dict[str, bool]:
    """Block Linear layers stored as fp8 -> whether they have a static input scale."""
    return {
        k[: -len(".weight")]: s.input_scale is not None
        for k, s in plan.sources.items()
        if s.kind == "fp8" and is_block_linear(k)
    }
