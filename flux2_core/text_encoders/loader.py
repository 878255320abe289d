"""Build a ``Flux2TextEncoder`` from any published text-encoder layout, never touching a hub.

The transformers model is built on the meta device from a config inferred from the checkpoint
(``layout.detect_layout``, or ``gguf.detect_gguf_layout`` for llama.cpp GGUFs), trimmed to the
layers FLUX.2 reads, and its parameters are assigned straight from the file's tensors (zero-copy
when the stored dtype is the requested one). Quantized decoder Linears stay in their stored bytes
(``FP8Linear`` for FP8 files, ``GGUFLinear`` for GGUF types) and are dequantized per layer when
they run; the token embedding and norms are converted to the compute dtype.
"""

from __future__ import annotations

import copy
import logging
import os
from collections.abc import Sequence

import torch
from torch import nn

from ..checkpoint.assign import check_tensors
from ..checkpoint.containers import open_model
from ..checkpoint.gguf_file import GGUFFile
from ..errors import CheckpointError
from ..quant.linear import QuantLinear
from ..quant.summary import quant_summary
from ..quant.swap import swap_linears
from .cache import EMBEDDING_CACHE, file_identity
from .encoder import Flux2TextEncoder
from .fp8 import layer_format
from .generator import GenerationParts
from .gguf import GGUFTextReader, detect_gguf_layout, gguf_prompt_tokenizer
from .layout import TextEncoderLayout, detect_layout
from .spec import MISTRAL3, TextEncoderSpec
from .tokenizer import load_prompt_tokenizer

logger = logging.getLogger(__name__)

_FP8 = (torch.float8_e4m3fn, torch.float8_e5m2)
_IGNORED_SUFFIXES = (".input_scale", ".scale_input", ".comfy_quant")


def _text_config(layout: TextEncoderLayout, n_layers: int):
    from transformers import MistralConfig, Qwen3Config

    s = layout.shape
    common = dict(
        vocab_size=s.vocab_size,
        hidden_size=s.hidden_size,
        intermediate_size=s.intermediate_size,
        num_hidden_layers=n_layers,
        num_attention_heads=s.num_attention_heads,
        num_key_value_heads=s.num_key_value_heads,
        head_dim=s.head_dim,
        rope_theta=s.rope_theta,
        rms_norm_eps=s.rms_norm_eps,
        max_position_embeddings=s.max_position_embeddings,
        tie_word_embeddings=s.tie_word_embeddings,
        attention_dropout=0.0,
        hidden_act="silu",
    )
    if layout.kind == MISTRAL3:
        cfg = MistralConfig(sliding_window=None, **common)
    else:
        cfg = Qwen3Config(attention_bias=False, use_sliding_window=False, **common)
    cfg._attn_implementation = "sdpa"
    return cfg


def _name_map(reader, layout: TextEncoderLayout) -> dict[str, str]:
    """Our parameter name -> file key, for every tensor a rule maps (scales renamed to ``weight_scale``)."""
    out = {}
    for key in reader.keys():
        ours = layout.our_name(key)
        if ours is None or ours.endswith(_IGNORED_SUFFIXES):
            continue
        if ours.endswith(".scale_weight"):  # legacy "scaled fp8"
            ours = ours[: -len("scale_weight")] + "weight_scale"
        out[ours] = key
    return out


def _dense(reader, names: dict[str, str], owner: str, key: str, dtype: torch.dtype) -> torch.Tensor:
    """A tensor outside the kept-quantized layers, in ``dtype`` (dequantized once if stored quantized)."""
    if isinstance(reader, GGUFTextReader):
        return reader.dequantize(key, dtype)
    t = reader.get(key)
    if t.dtype in _FP8:  # an fp8 tensor outside a kept Linear: dequantize now with its scale
        scale_key = names.get(owner + ".weight_scale")
        scale = reader.get(scale_key).to(torch.float32) if scale_key else 1.0
        return (t.to(torch.float32) * scale).to(dtype)
    return t.to(dtype)


def _assign(
    module: nn.Module, prefix: str, names: dict[str, str], reader, dtype: torch.dtype, path: str
) -> None:
    """Assign the file's tensors to every parameter/persistent buffer of ``module`` (strict)."""
    quant = {n: m for n, m in module.named_modules() if isinstance(m, QuantLinear)}
    wanted = module.state_dict(keep_vars=True)
    state = {}
    for local, param in wanted.items():
        key = names.get(prefix + local)
        if key is None:
            continue  # reported as missing below
        owner, _, pname = local.rpartition(".")
        if owner in quant:  # stored bytes as they are; fp32 scales shaped like the layer's
            t = reader.get(key)
            state[local] = t if pname == "weight" else t.to(torch.float32).reshape(param.shape)
        else:
            state[local] = _dense(reader, names, prefix + owner, key, dtype)
    expected = {k: tuple(v.shape) for k, v in wanted.items()}
    check_tensors(
        path,
        "the inferred text-encoder model",
        expected,
        {k: tuple(v.shape) for k, v in state.items()},
        fix="Download the complete text-encoder file(s); it is damaged or not a Mistral Small 3.x / Qwen3 "
        "text encoder.",
    )
    module.load_state_dict(state, strict=True, assign=True)


def _fresh_rotary(model: nn.Module, device: torch.device | str) -> None:
    # Built on meta, the non-persistent inv_freq buffer has no values: rebuild it for real.
    with torch.device(device):
        model.rotary_emb = type(model.rotary_emb)(config=model.config)


def _tekken_bytes(reader, layout: TextEncoderLayout) -> bytes | None:
    if layout.tekken_key is None:
        return None
    return reader.get(layout.tekken_key).contiguous().numpy().tobytes()


def load_text_encoder(
    path: str | os.PathLike,
    tokenizer: str | os.PathLike | None = None,
    dtype: torch.dtype = torch.bfloat16,
    device: torch.device | str = "cpu",
    cache=EMBEDDING_CACHE,
    fallback_tokenizers: Sequence[str | os.PathLike] = (),
) -> Flux2TextEncoder:
    """Load a FLUX.2 text encoder (Mistral Small 3.x for [dev], Qwen3 4B/8B for [klein]).

    Args:
        path: a single ``.safetensors`` file (ComfyUI ``mistral_3_small_flux2_*``, ``qwen_3_4b``,
            ``qwen_3_8b*``, fp8 variants, the pruned 30-layer Mistral, or a checkpoint bundling
            ``text_encoders.*``), a llama.cpp ``.gguf`` (Qwen3 as "qwen3", Mistral Small 3.x as "llama"
            or "mistral3"; its tokenizer is rebuilt from the file's ``tokenizer.ggml.*`` fields), a
            transformers ``text_encoder/`` folder, or a diffusers pipeline folder.
        tokenizer: optional tokenizer file or folder; by default it is found next to the model (or, for
            ComfyUI's Mistral files, read from the embedded ``tekken_model`` tensor).
        dtype: compute dtype (FP8-stored Linear weights stay FP8 and are dequantized to it per layer).
        device: where the weights live.
        cache: embedding cache to use (``None`` disables caching).
        fallback_tokenizers: tokenizer folders tried last when none is given or found next to the model
            (ComfyUI's Qwen3 files carry no tokenizer; the nodes pass ComfyUI's bundled Qwen BPE files).

    Returns:
        A ``Flux2TextEncoder`` holding only the decoder layers FLUX.2 reads (30 or 27).

    Raises:
        CheckpointError: not a FLUX.2 text encoder, incomplete, unsupported quantization, or no
            tokenizer found (a GGUF without tokenizer fields, unless ``tokenizer`` is given).
    """
    from transformers import MistralModel, Qwen3Model

    reader = open_model(path, subfolder="text_encoder")
    root = reader.path
    if isinstance(reader, GGUFFile):
        reader = GGUFTextReader(reader)
        layout = detect_gguf_layout(reader)
    else:
        layout = detect_layout(reader, root)
    spec = TextEncoderSpec.for_kind(layout.kind)
    n_file = layout.shape.num_hidden_layers
    if n_file < spec.layers_needed:
        raise CheckpointError(
            root,
            f"has {n_file} decoder layers; FLUX.2 reads layer {spec.layers_needed}.",
            "Use the complete text-encoder file.",
        )
    if isinstance(reader, GGUFTextReader) and tokenizer is None:
        # A GGUF carries its own tokenizer: rebuilt from its fields, never guessed from elsewhere.
        prompt_tok = gguf_prompt_tokenizer(reader.file, layout.kind)
    else:
        prompt_tok = load_prompt_tokenizer(
            layout.kind,
            root,
            tokenizer,
            tekken_bytes=_tekken_bytes(reader, layout),
            fallback_dirs=fallback_tokenizers,
        )
    names = _name_map(reader, layout)

    cfg = _text_config(layout, n_file)
    with torch.device("meta"):
        model = (MistralModel if layout.kind == MISTRAL3 else Qwen3Model)(cfg)
    model.eval().requires_grad_(False)
    # Decoder Linears stored quantized (all of them in ComfyUI's fp8 files, some in "mixed" ones,
    # every quantized one in a GGUF) stay in their stored bytes.
    formats = {}
    for name, module in model.layers.named_modules():
        key = names.get(f"model.layers.{name}.weight")
        if type(module) is nn.Linear and module.bias is None and key is not None:
            fmt = layer_format(reader, key, names.get(f"model.layers.{name}.weight_scale"))
            if fmt is not None:
                formats[name] = fmt
    swap_linears(model.layers, formats)
    # The final norm only matters for generation; ComfyUI's pruned [dev] file has no use for (or copy of) it.
    has_final_norm = "model.norm.weight" in names
    if not has_final_norm:
        model.norm = nn.Identity()
    later = list(model.layers[spec.layers_needed :])
    model.layers = nn.ModuleList(list(model.layers[: spec.layers_needed]))
    _assign(model, "model.", names, reader, dtype, root)
    _fresh_rotary(model, "cpu")

    files = [f.path for f in reader.files]
    encoder = Flux2TextEncoder(spec, model, prompt_tok, identity=file_identity(files), cache=cache)
    encoder.checkpoint_layout, encoder.quant = layout.name, layout.quant
    encoder.checkpoint_format = "gguf" if isinstance(reader, GGUFTextReader) else layout.name
    encoder.quant_summary = _summary(reader, names)
    encoder.to(device)
    encoder.generation_source = _generation_source(
        reader, layout, names, later, dtype, root, has_final_norm, model.embed_tokens
    )
    encoder.weight_source = EncoderWeightSource(reader, names)
    logger.info(
        "loaded %s text encoder from %s (%s layout, %d of %d layers, context %d)",
        layout.kind,
        root,
        layout.name,
        spec.layers_needed,
        n_file,
        encoder.context_dim,
    )
    return encoder


def _summary(reader, names: dict[str, str]) -> dict[str, float]:
    """Storage type -> fraction of the encoder's parameters, as the file stores them."""
    dtype_names = {
        torch.bfloat16: "BF16",
        torch.float16: "F16",
        torch.float32: "F32",
        torch.float8_e4m3fn: "FP8_E4M3",
        torch.float8_e5m2: "FP8_E5M2",
    }
    entries = []
    for ours, key in names.items():
        if ours.endswith((".weight_scale", ".tekken_model")) or ours == "tekken_model":
            continue
        shape = reader.shape(key)
        n = 1
        for s in shape:
            n *= s
        storage = (
            reader.storage(key) if isinstance(reader, GGUFTextReader) else dtype_names.get(reader.dtype(key))
        )
        if storage is not None:
            entries.append((storage, n))
    return quant_summary(entries)


class EncoderWeightSource:
    """``read_into(param_name, out)`` over the encoder's file(s), for the weight-streaming manager.

    Parameter names are the encoder's (``model.layers.3.mlp.up_proj.weight``); the file keys may carry
    other prefixes. Bytes go straight from the file into ``out`` when the stored dtype is ``out``'s,
    otherwise the tensor is converted on the way.
    """

    def __init__(self, reader, names: dict[str, str]):
        self.reader = reader
        self.names = names

    def read_into(self, name: str, out: torch.Tensor) -> None:
        key = self.names.get(name)
        if key is None:
            raise KeyError(f"{name} is not stored in {self.reader.path}")
        if self.reader.dtype(key) == out.dtype and tuple(self.reader.shape(key)) == tuple(out.shape):
            self.reader.read_into(key, out)
        else:
            out.copy_(self.reader.get(key).reshape(out.shape).to(out.dtype))


def _generation_source(
    reader,
    layout: TextEncoderLayout,
    names: dict[str, str],
    later: list[nn.Module],
    dtype: torch.dtype,
    root: str,
    has_final_norm: bool,
    embed_tokens: nn.Embedding,
):
    """A loader of what writing text needs beyond encoding, run anew for every ``TextGenerator``.

    ``later`` are the meta-device templates of the decoder layers past the encoder's; each call
    assigns copies of them, so nothing loaded here outlives the generator that uses it.
    """

    def load() -> GenerationParts:
        if layout.kind == MISTRAL3 and layout.shape.num_hidden_layers < 40:
            raise CheckpointError(
                root,
                f"is the pruned {layout.shape.num_hidden_layers}-layer [dev] encoder, "
                "which can embed prompts but cannot write text.",
                "Use the full mistral_3_small_flux2 file (40 layers) for prompt upsampling.",
            )
        if not has_final_norm:
            raise CheckpointError(
                root,
                "has no final norm (model.norm.weight), so it cannot write text.",
                "Use the complete text-encoder file for prompt upsampling.",
            )
        first = layout.shape.num_hidden_layers - len(later)  # the encoder's layers come first
        layers = copy.deepcopy(later)
        for j, layer in enumerate(layers):
            _assign(layer, f"model.layers.{first + j}.", names, reader, dtype, root)
        head = nn.Linear(layout.shape.hidden_size, layout.shape.vocab_size, bias=False, device="meta")
        if "lm_head.weight" in names:
            _assign(head, "lm_head.", names, reader, dtype, root)
        elif layout.shape.tie_word_embeddings:
            head.weight = embed_tokens.weight  # Qwen3-4B: the output head is the embedding matrix
        else:
            raise CheckpointError(
                root,
                "has no output head (lm_head.weight), so it cannot write text.",
                "Use the full model (e.g. the Hugging Face text_encoder/ folder) for upsampling.",
            )
        parts = GenerationParts(later_layers=layers, lm_head=head)
        if layout.vlm_config is not None:
            from transformers import AutoModel, Mistral3Config
            from transformers.models.mistral3.modeling_mistral3 import Mistral3MultiModalProjector

            vcfg = Mistral3Config(**layout.vlm_config)
            vcfg.vision_config._attn_implementation = "sdpa"
            with torch.device("meta"):
                vision = AutoModel.from_config(vcfg.vision_config)
                projector = Mistral3MultiModalProjector(vcfg)
            _assign(vision, "vision_tower.", names, reader, dtype, root)
            _assign(projector, "multi_modal_projector.", names, reader, dtype, root)
            vision.patch_positional_embedding = type(vision.patch_positional_embedding)(vcfg.vision_config)
            parts.vision_tower, parts.multi_modal_projector, parts.vlm_config = vision, projector, vcfg
        return parts

    return load
