"""Model sets for `time_to_image.py`: random weights in the published layouts, written tensor by tensor.

The layouts are flux2_core/tiny's (the same key names, quantization and header metadata as the tiny
writers the tests use), at the published sizes: every tensor is generated (on the GPU when there is
one), converted to its layout and written to the file before the next one is made, so host RAM never
holds more than one tensor of a model. `--smoke` writes the same files at tiny sizes through the same
code. GGUF transformers come from flux2_core/tiny/gguf.py's writer (tensor by tensor too, the common
FLUX converter's layout, the Q4_K_M storage mix). The VAE is always full size (ComfyUI's VAELoader
hard-codes FLUX.2's widths) and small enough to build in memory.
"""

from __future__ import annotations

import json
import math
import os
import struct
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from flux2_core.config import Flux2Config, bfl_shapes, is_block_linear
from flux2_core.text_encoders.spec import DECODER_PRESETS, DecoderShape
from flux2_core.tiny import TRANSFORMER_FILES
from flux2_core.tiny.text_encoder import decoder_state, is_decoder_linear, quantize_fp8
from flux2_core.tiny.transformer import COMFY_PREFIX, quantize_layout, tiny_config

GiB = 1 << 30

_ST_DTYPES = {
    torch.float32: "F32",
    torch.bfloat16: "BF16",
    torch.float16: "F16",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2",
    torch.uint8: "U8",
    torch.int8: "I8",
    torch.int32: "I32",
    torch.int64: "I64",
}
_COMFY_QUANT = json.dumps({"format": "float8_e4m3fn"}).encode()  # what the tiny FP8 writers store


@dataclass(frozen=True)
class ModelSet:
    """One benchmark model set: files under ComfyUI's model folders and the workflow that uses them.

    Attributes:
        name: "klein4b", "klein9b", "dev", "dev-gguf".
        transformer: file name under diffusion_models/ (its layout comes from flux2_core/tiny's table,
            or `transformer_layout`).
        variant: Flux2Config preset.
        text_encoder: file name under text_encoders/.
        te_kind: "qwen3-4b", "qwen3-8b" or "mistral3".
        te_layout: "comfyui" (bf16) or "comfyui-fp8".
        workflow: the shipped API workflow (workflows/api/<name>.api.json) run by our nodes.
        transformer_layout: layout override (None: the tiny set's layout for that file name);
            "gguf-<mix>" writes a GGUF with that storage mix (e.g. "gguf-Q4_K_M").
    """

    name: str
    transformer: str
    variant: str
    text_encoder: str
    te_kind: str
    te_layout: str
    workflow: str
    transformer_layout: str | None = None

    @property
    def layout(self) -> str:
        if self.transformer_layout:
            return self.transformer_layout
        return next(lay for name, _v, lay in TRANSFORMER_FILES if name == self.transformer)


VAE_FILE = "flux2-vae.safetensors"
SETS = {
    "klein4b": ModelSet(
        "klein4b",
        "flux-2-klein-4b.safetensors",
        "klein-4b",
        "qwen_3_4b.safetensors",
        "qwen3-4b",
        "comfyui",
        "flux2_klein_4b_text_to_image",
    ),
    "klein9b": ModelSet(
        "klein9b",
        "flux-2-klein-9b.safetensors",
        "klein-9b",
        "qwen_3_8b.safetensors",
        "qwen3-8b",
        "comfyui",
        "flux2_klein_4b_text_to_image",  # the same graph with the 9B files
    ),
    "dev": ModelSet(
        "dev",
        "flux2_dev_fp8mixed.safetensors",
        "dev",
        "mistral_3_small_flux2_fp8.safetensors",
        "mistral3",
        "comfyui-fp8",
        "flux2_dev_text_to_image",
    ),
    # The usual small-card [dev]: a Q4_K_M GGUF transformer (ComfyUI-GGUF's loader on ComfyUI's side)
    # with ComfyUI's FP8 Mistral encoder.
    "dev-gguf": ModelSet(
        "dev-gguf",
        "flux2-dev-Q4_K_M.gguf",
        "dev",
        "mistral_3_small_flux2_fp8.safetensors",
        "mistral3",
        "comfyui-fp8",
        "flux2_dev_text_to_image",
        transformer_layout="gguf-Q4_K_M",
    ),
}
_TE_PRESET = {"qwen3-4b": "qwen3-4b", "qwen3-8b": "qwen3-8b", "mistral3": "mistral-small-3.2-24b"}


# ------------------------------------------------------------------------ the streamed writer
def write_streamed(
    path: Path,
    tensors: Iterable[tuple[str, tuple[int, ...], torch.dtype, Callable[[], dict[str, torch.Tensor]]]],
    metadata: dict[str, str] | None = None,
) -> int:
    """Write a safetensors file one source tensor at a time.

    Args:
        path: the file (written as <path>.part, renamed when complete).
        tensors: (source key, shape, dtype, make) in file order; `make()` returns the entries that
            source tensor becomes in the layout (e.g. an FP8 weight, its scale and marker).
        metadata: the header's ``__metadata__``.

    Returns:
        Bytes written.
    """
    items = list(tensors)
    # Pass 1 on the meta device: the entries' names, shapes and dtypes, for the header.
    plan: list[tuple[str, list[str]]] = []
    header: dict[str, object] = {}
    offset = 0
    for _key, _shape, _dtype, make in items:
        with torch.device("meta"):
            entries = make()
        plan.append((_key, list(entries)))
        for name, t in entries.items():
            n = t.numel() * t.element_size()
            header[name] = {
                "dtype": _ST_DTYPES[t.dtype],
                "shape": list(t.shape),
                "data_offsets": [offset, offset + n],
            }
            offset += n
    if metadata:
        header["__metadata__"] = metadata
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".part")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for (_key, names), (_k, _s, _d, make) in zip(plan, items):
            entries = make()
            assert list(entries) == names, (names, list(entries))
            for name in names:
                t = entries[name].detach().to("cpu").contiguous().reshape(-1)
                want = header[name]
                assert _ST_DTYPES[t.dtype] == want["dtype"] and t.numel() == math.prod(want["shape"]), name
                f.write(t.view(torch.uint8).numpy())
    os.replace(tmp, path)
    return path.stat().st_size


class _Rand:
    """Random tensors made on `device` from a per-key seed (the same weights whatever the order); on
    the meta device (the header pass) only the shapes."""

    def __init__(self, device: torch.device, seed: int) -> None:
        self.device, self.seed = torch.device(device), seed

    def normal(self, key: str, shape, std: float, mean: float = 0.0) -> torch.Tensor:
        if torch.get_default_device().type == "meta":
            return torch.empty(shape, dtype=torch.float32)
        g = torch.Generator(self.device).manual_seed(zlib.crc32(key.encode()) ^ self.seed)
        t = torch.randn(shape, generator=g, device=self.device, dtype=torch.float32)
        return t.mul_(std).add_(mean)


# ---------------------------------------------------------------------------------- transformer
def transformer_config(variant: str, smoke: bool, context_dim: int | None = None) -> Flux2Config:
    if smoke:
        return tiny_config(variant, depth=2, depth_single=2, context_dim=context_dim)
    return Flux2Config.from_name(variant)


def write_transformer(
    path: Path, variant: str, layout: str, rand: _Rand, smoke: bool, context_dim: int
) -> int:
    """A FLUX.2 transformer in flux2_core/tiny's `layout` ("bfl", "comfyui", "comfy-fp8", "bfl-fp8",
    or "gguf-<mix>")."""
    cfg = transformer_config(variant, smoke, context_dim)
    if layout.startswith("gguf-"):
        from flux2_core.tiny.gguf import write_tiny_gguf_transformer

        tmp = path.with_name(path.name + ".part.gguf")
        write_tiny_gguf_transformer(tmp, variant, mix=layout[len("gguf-") :], seed=rand.seed, config=cfg)
        os.replace(tmp, path)
        return path.stat().st_size
    quant = layout in ("comfy-fp8", "bfl-fp8")
    prefix = COMFY_PREFIX if layout in ("comfyui", "comfy-fp8") else ""

    def maker(key, shape):
        def make():
            # As random_bfl_state_dict: linears ~ N(0, 1/fan_in), QK-norm scales ~ 1 + N(0, 0.1).
            if key.endswith(".scale"):
                w = rand.normal(key, shape, 0.1, 1.0)
            else:
                w = rand.normal(key, shape, 1 / math.sqrt(shape[1]))
            w = w.to(torch.bfloat16)
            out = quantize_layout({key: w}, layout) if quant and is_block_linear(key) else {key: w}
            return {prefix + k: v for k, v in out.items()}

        return make

    shapes = bfl_shapes(cfg)
    metadata = None
    if quant:
        layers = {k[: -len(".weight")]: {"format": "float8_e4m3fn"} for k in shapes if is_block_linear(k)}
        metadata = {"_quantization_metadata": json.dumps({"format_version": "1.0", "layers": layers})}
    return write_streamed(
        path, [(k, tuple(s), torch.bfloat16, maker(k, tuple(s))) for k, s in shapes.items()], metadata
    )


# ---------------------------------------------------------------------------------- text encoder
def decoder_shape(kind: str, smoke: bool) -> DecoderShape:
    """The published shape, or (smoke) the tiny test encoders' widths with the real layer counts and
    vocabularies (so the real tokenizers and layer indices apply)."""
    real = DECODER_PRESETS[_TE_PRESET[kind]]
    if not smoke:
        return real
    return DecoderShape(
        real.vocab_size, 64, 128 if kind != "qwen3-8b" else 160, real.num_hidden_layers, 2, 1, 32,
        real.rope_theta, real.rms_norm_eps, 4096, real.tie_word_embeddings,
    )  # fmt: skip


def _meta_decoder(kind: str, shape: DecoderShape) -> torch.nn.Module:
    """The transformers model of that shape on the meta device (for its state-dict names only)."""
    from transformers import (
        Mistral3Config,
        Mistral3ForConditionalGeneration,
        MistralConfig,
        PixtralVisionConfig,
        Qwen3Config,
        Qwen3ForCausalLM,
    )

    common = dict(
        vocab_size=shape.vocab_size,
        hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.num_hidden_layers,
        num_attention_heads=shape.num_attention_heads,
        num_key_value_heads=shape.num_key_value_heads,
        head_dim=shape.head_dim,
        rope_theta=shape.rope_theta,
        rms_norm_eps=shape.rms_norm_eps,
        max_position_embeddings=shape.max_position_embeddings,
        tie_word_embeddings=shape.tie_word_embeddings,
    )
    with torch.device("meta"):
        if kind == "mistral3":
            vision = PixtralVisionConfig(
                hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, head_dim=16
            )
            cfg = Mistral3Config(
                text_config=MistralConfig(sliding_window=None, **common), vision_config=vision
            )
            return Mistral3ForConditionalGeneration(cfg)
        return Qwen3ForCausalLM(Qwen3Config(**common))


def write_text_encoder(
    path: Path, kind: str, layout: str, rand: _Rand, smoke: bool, tekken: Path | None
) -> int:
    """A text encoder in flux2_core/tiny's ComfyUI layouts ("comfyui" bf16 or "comfyui-fp8")."""
    shape = decoder_shape(kind, smoke)
    names = decoder_state(_meta_decoder(kind, shape), kind)
    if kind == "mistral3":
        names.pop("lm_head.weight")  # ComfyUI's [dev] encoder files are text-only embedders (no head)

    def maker(key, t_shape):
        def make():
            if key.endswith("norm.weight"):
                w = rand.normal(key, t_shape, 0.1, 1.0)
            elif len(t_shape) == 2 and "embed_tokens" not in key:
                w = rand.normal(key, t_shape, 1 / math.sqrt(t_shape[1]))
            else:
                w = rand.normal(key, t_shape, 1.0)
            w = w.to(torch.bfloat16)
            if layout == "comfyui-fp8" and is_decoder_linear(key):
                w8, scale = quantize_fp8(w)
                base = key[: -len(".weight")]
                marker = torch.tensor(list(_COMFY_QUANT), dtype=torch.uint8)
                return {key: w8, base + ".weight_scale": scale, base + ".comfy_quant": marker}
            return {key: w}

        return make

    items = [(k, tuple(t.shape), torch.bfloat16, maker(k, tuple(t.shape))) for k, t in names.items()]
    if kind == "mistral3":
        if tekken is None or not tekken.is_file():
            raise FileNotFoundError(
                "a tekken.json is needed for a ComfyUI Mistral file (it embeds the tokenizer)"
            )
        data = tekken.read_bytes()

        def tok():
            return {"tekken_model": torch.frombuffer(bytearray(data), dtype=torch.uint8).clone()}

        items.append(("tekken_model", (len(data),), torch.uint8, tok))
    return write_streamed(path, items)


def write_vae(path: Path, seed: int) -> int:
    from flux2_core.tiny.vae import write_tiny_vae
    from flux2_core.vae import Flux2VAEConfig

    write_tiny_vae(
        path, layout="comfyui", seed=seed, config=Flux2VAEConfig.from_name("flux2"), dtype=torch.bfloat16
    )
    return path.stat().st_size


# ---------------------------------------------------------------------------------- a whole set
def set_files(models: Path, s: ModelSet) -> dict[str, Path]:
    return {
        "transformer": models / "diffusion_models" / s.transformer,
        "text_encoder": models / "text_encoders" / s.text_encoder,
        "vae": models / "vae" / VAE_FILE,
    }


def write_set(
    models: Path, s: ModelSet, *, smoke: bool, device: torch.device, tekken: Path | None, log
) -> dict:
    """Write one set into ComfyUI's model folders (skipping files a previous run of the same set and
    size left); returns {"bytes": ..., "seconds": ...} of what was written now."""
    import time

    marker = models / "flux2bench-set.json"
    want = {"set": s.name, "smoke": smoke}
    files = set_files(models, s)
    if (
        marker.is_file()
        and json.loads(marker.read_text()) == want
        and all(p.is_file() for p in files.values())
    ):
        log(
            f"model set {s.name} already on disk ({sum(p.stat().st_size for p in files.values()) / GiB:.1f} GiB)"
        )
        return {"bytes": 0, "seconds": 0.0, "reused": True}
    marker.unlink(missing_ok=True)
    rand = _Rand(device, seed=1234)
    t0 = time.perf_counter()
    shape = decoder_shape(s.te_kind, smoke)
    context = shape.hidden_size * 3
    n = write_text_encoder(files["text_encoder"], s.te_kind, s.te_layout, rand, smoke, tekken)
    log(f"wrote {files['text_encoder'].name}: {n / GiB:.2f} GiB")
    n2 = write_transformer(files["transformer"], s.variant, s.layout, rand, smoke, context)
    log(f"wrote {files['transformer'].name} ({s.layout}): {n2 / GiB:.2f} GiB")
    n3 = write_vae(files["vae"], seed=5) if not files["vae"].is_file() else 0
    marker.write_text(json.dumps(want))
    dt = time.perf_counter() - t0
    log(
        f"model set {s.name} written in {dt:.0f} s ({(n + n2 + n3) / GiB:.1f} GiB, {(n + n2 + n3) / dt / 1e9:.2f} GB/s)"
    )
    return {"bytes": n + n2 + n3, "seconds": dt, "reused": False}


def delete_sets(models: Path, keep: ModelSet | None = None) -> None:
    """Delete every benchmark model file except `keep`'s (one set on disk at a time)."""
    keep_files = set(set_files(models, keep).values()) if keep else set()
    for sub in ("diffusion_models", "text_encoders"):
        for p in [*(models / sub).glob("*.safetensors*"), *(models / sub).glob("*.gguf*")]:
            if p not in keep_files:
                p.unlink()
    if keep is None:
        (models / "flux2bench-set.json").unlink(missing_ok=True)
