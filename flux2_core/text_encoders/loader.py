"""Build a ``Flux2TextEncoder`` from any published text-encoder layout, never touching a hub.

The transformers model is built on the meta device from a config inferred from the checkpoint
(``layout.detect_layout``), trimmed to the layers FLUX.2 reads, and its parameters are assigned
straight from the safetensors tensors (zero-copy when the stored dtype is the requested one).
FP8-stored decoder Linears stay FP8 (``Fp8Linear``) and are dequantized per layer when they run.
"""

from __future__ import annotations

import copy
import logging
import os
from collections.abc import Sequence

import torch
from torch import nn

from ..checkpoint import open_checkpoint
from ..errors import CheckpointError
from .cache import EMBEDDING_CACHE, file_identity
from .encoder import Flux2TextEncoder
from .fp8 import Fp8Linear, swap_fp8_linears
from .generator import GenerationParts
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


def _assign(
    module: nn.Module, prefix: str, names: dict[str, str], reader, dtype: torch.dtype, path: str
) -> None:
    """Assign the file's tensors to every parameter/persistent buffer of ``module`` (strict)."""
    fp8_modules = {n for n, m in module.named_modules() if isinstance(m, Fp8Linear)}
    state = {}
    missing = []
    expected = list(module.state_dict(keep_vars=True).keys())
    for local in expected:
        key = names.get(prefix + local)
        if key is None:
            missing.append(prefix + local)
            continue
        t = reader.get(key)
        owner = local.rsplit(".", 1)[0]
        if owner in fp8_modules:
            state[local] = t if local.endswith(".weight") else t.to(torch.float32).reshape(())
        elif t.dtype in _FP8:  # an fp8 tensor outside a Linear: dequantize now with its scale
            scale_key = names.get(prefix + owner + ".weight_scale")
            scale = reader.get(scale_key).to(torch.float32) if scale_key else 1.0
            state[local] = (t.to(torch.float32) * scale).to(dtype)
        else:
            state[local] = t.to(dtype)
    if missing:
        raise CheckpointError(
            path,
            f"is missing {len(missing)} tensor(s) the model needs, e.g. {sorted(missing)[:8]}.",
            "Download the complete text-encoder file(s).",
        )
    try:
        module.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as e:
        raise CheckpointError(
            path,
            f"has tensors whose shapes do not fit the inferred model: {e}",
            "The file is damaged or not a Mistral Small 3.x / Qwen3 text encoder.",
        ) from None


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
            ``text_encoders.*``), a transformers ``text_encoder/`` folder, or a diffusers pipeline folder.
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
        CheckpointError: not a FLUX.2 text encoder, incomplete, or no tokenizer found.
    """
    from transformers import MistralModel, Qwen3Model

    reader = open_checkpoint(path, subfolder="text_encoder")
    root = reader.path
    layout = detect_layout(reader, root)
    spec = TextEncoderSpec.for_kind(layout.kind)
    n_file = layout.shape.num_hidden_layers
    if n_file < spec.layers_needed:
        raise CheckpointError(
            root,
            f"has {n_file} decoder layers; FLUX.2 reads layer {spec.layers_needed}.",
            "Use the complete text-encoder file.",
        )
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
    # Linears stored as float8 (all of them in ComfyUI's fp8 files, some in "mixed" ones) stay float8.
    swap_fp8_linears(
        model.layers,
        lambda name: (
            reader.dtype(names[f"model.layers.{name}.weight"])
            if f"model.layers.{name}.weight" in names
            else None
        ),
    )
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
