"""Tiny random GGUF files written the way the converters write them (tests, benchmarks, demo).

Transformers follow the common FLUX converter: BFL key names (optionally with the
``model.diffusion_model.`` prefix), ``general.architecture`` "flux" (or "flux2"), 1-D tensors and
tensors of at most 1024 values in F32, everything else in the mix's type per tensor (a row length
the type's block does not divide falls back to F16, as llama.cpp's quantizer does).

Text encoders follow llama.cpp's ``convert_hf_to_gguf.py``: ``token_embd`` / ``blk.N.attn_q`` ...
names, per-architecture hyper-parameter fields, the tokenizer in ``tokenizer.ggml.*`` fields, and
for the "llama" / "mistral3" architectures the Q and K rows permuted for llama.cpp's rotary layout.

Quantized blocks are random codes with scales chosen so each tensor has the requested spread;
K-quant and IQ types cannot be produced by the ``gguf`` package's quantizer, so every quantized
type is written directly as bytes. ``exact_fp16=True`` draws power-of-two scales with the
(sub-)scale ranges capped so that a dequantizer computing in float16 (ComfyUI-GGUF's default)
gets exactly the float32 values: the same file then means the same weights to every reader.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

import numpy as np
import torch

from ..config import bfl_shapes
from ..quant.ggml import GGML_TYPES
from .transformer import FILE_NAMES, random_bfl_state_dict, tiny_config

# fp16 fields of each block type: (byte offset, role). "d" scales the codes; "min" is the offset
# term (subtracted: K-quants' dmin; added: Q4_1/Q5_1's m), set to ``centre`` x d so values are
# roughly zero-mean.
F16_FIELDS: dict[str, tuple[tuple[int, str], ...]] = {
    "Q8_0": ((0, "d"),),
    "Q4_0": ((0, "d"),),
    "Q5_0": ((0, "d"),),
    "IQ4_NL": ((0, "d"),),
    "IQ4_XS": ((0, "d"),),
    "Q4_1": ((0, "d"), (2, "min")),
    "Q5_1": ((0, "d"), (2, "min")),
    "Q2_K": ((80, "d"), (82, "min")),
    "Q3_K": ((108, "d"),),
    "Q4_K": ((0, "d"), (2, "min")),
    "Q5_K": ((0, "d"), (2, "min")),
    "Q6_K": ((208, "d"),),
}
# min = centre x d: Q4_1/Q5_1 add m (so negative), K-quants subtract dmin x m (positive).
CENTRE = {"Q4_1": -8.0, "Q5_1": -16.0, "Q2_K": 2.0, "Q4_K": 8.0, "Q5_K": 16.0}
# Q6_K's int8 sub-scales (bytes 192:208) capped at |s| <= 63 in exact mode (|s x q| < 2048).
_INT8_SCALES = {"Q6_K": (192, 208)}

# Storage mixes: (regex on the BFL name, type) rules, first match wins, then the default type.
# "Q4_K_M" keeps the output projections and the non-block layers in Q6_K, like the published
# Q4_K_M files keep some tensors in higher precision; "mixed" cycles every supported type
# through the block linears (test coverage of every decoder in one model).
MIXES: dict[str, tuple[tuple[tuple[str, str], ...], str]] = {
    "Q4_K_M": (
        (
            (r"\.(linear2|img_mlp\.2|txt_mlp\.2)\.weight$", "Q6_K"),
            (r"^(img_in|txt_in|time_in|guidance_in|final_layer|double_stream|single_stream)", "Q6_K"),
        ),
        "Q4_K",
    ),
    **{t: ((), t) for t in GGML_TYPES},
}
MIXED_TYPES = (
    "Q8_0",
    "Q4_0",
    "Q4_1",
    "Q5_0",
    "Q5_1",
    "Q2_K",
    "Q3_K",
    "Q4_K",
    "Q5_K",
    "Q6_K",
    "IQ4_NL",
    "IQ4_XS",
)


def _gguf():
    import gguf

    return gguf


def random_quant_blocks(
    type_name: str,
    rows: int,
    cols: int,
    std: float,
    rng: np.random.Generator,
    exact_fp16: bool = False,
    calibrate_rows: int | None = None,
) -> np.ndarray:
    """Random stored bytes (rows, bytes per row) of a ``type_name`` tensor with spread ``std``.

    The values these bytes decode to are defined by the reference decoder (``gguf.quants.dequantize``).
    ``calibrate_rows`` measures the spread on the first rows only (full-size benchmark tensors).
    """
    g = _gguf()
    t = GGML_TYPES[type_name]
    raw = rng.integers(0, 256, (rows, t.row_bytes(cols)), dtype=np.uint8)
    blocks = raw.reshape(-1, t.type_size)
    if exact_fp16 and type_name in _INT8_SCALES:
        a, b = _INT8_SCALES[type_name]
        blocks[:, a:b] = rng.integers(-63, 64, (blocks.shape[0], b - a), dtype=np.int8).view(np.uint8)
    if exact_fp16:  # power-of-two block scales: 1/2, 1 or 2 of the tensor's unit
        d = np.exp2(rng.integers(-1, 2, blocks.shape[0])).astype(np.float32)
    else:
        d = rng.uniform(0.5, 1.5, blocks.shape[0]).astype(np.float32)

    def put(scale: np.ndarray) -> None:
        for offset, role in F16_FIELDS[type_name]:
            value = scale * (CENTRE.get(type_name, 0.0) if role == "min" else 1.0)
            blocks[:, offset : offset + 2] = value.astype(np.float16).view(np.uint8).reshape(-1, 2)

    put(d)
    sample = raw if calibrate_rows is None else raw[:calibrate_rows]
    ref = g.quants.dequantize(sample, g.GGMLQuantizationType[type_name])
    spread = float(ref.std()) or 1.0
    factor = std / spread
    if exact_fp16:
        factor = float(2.0 ** round(math.log2(factor)))
    put(d * factor)
    return raw


def _store(name: str, shape: tuple[int, ...], type_name: str, w: torch.Tensor, rng, exact_fp16: bool):
    """(data, raw_dtype) for GGUFWriter.add_tensor: F32/F16/BF16 from ``w``, quantized as random blocks."""
    g = _gguf()
    if type_name == "F32":
        return w.float().numpy(), None
    if type_name == "F16":
        return w.half().numpy(), None
    if type_name == "BF16":
        return w.bfloat16().view(torch.int16).numpy().view(np.uint8), g.GGMLQuantizationType.BF16
    rows = math.prod(shape[:-1])
    data = random_quant_blocks(type_name, rows, shape[-1], float(w.float().std()), rng, exact_fp16)
    return data.reshape(*shape[:-1], -1), g.GGMLQuantizationType[type_name]


def storage_for(name: str, shape: tuple[int, ...], mix: str, index: int = 0) -> str:
    """The GGML type the converter gives tensor ``name`` of ``shape`` under ``mix``."""
    if len(shape) < 2 or math.prod(shape) <= 1024:
        return "F32"  # converters keep 1-D and small tensors in full precision
    if mix == "mixed":  # the index-th type in turn, skipping those whose block does not divide the row
        fits = [t for t in MIXED_TYPES if shape[-1] % GGML_TYPES[t].block == 0]
        return fits[index % len(fits)]
    else:
        rules, t = MIXES[mix]
        t = next((typ for pat, typ in rules if re.search(pat, name)), t)
    q = GGML_TYPES[t]
    return t if shape[-1] % q.block == 0 else "F16"


def write_tiny_gguf_transformer(
    path: str | os.PathLike,
    variant: str = "klein-4b",
    mix: str = "Q4_K_M",
    prefix: bool = False,
    arch: str = "flux",
    seed: int = 0,
    depth: int = 2,
    depth_single: int = 2,
    context_dim: int | None = None,
    exact_fp16: bool = False,
    config=None,
) -> Path:
    """Write a tiny random FLUX.2 transformer GGUF.

    Args:
        path: a folder (the file gets the variant's real name plus the mix, e.g.
            ``flux-2-klein-4b-Q4_K_M.gguf``) or a ``.gguf`` file path.
        variant: FLUX.2 variant (its flags; the name tells base / KV apart, as with real files).
        mix: a key of ``MIXES`` (one type everywhere, or "Q4_K_M"), or "mixed" (every type in turn).
        prefix: keep ComfyUI's ``model.diffusion_model.`` prefix (some converters do).
        arch: ``general.architecture`` ("flux" as the common converter writes, or "flux2").
        seed: weight seed.
        depth, depth_single, context_dim: tiny shapes (see ``tiny_config``).
        exact_fp16: scales that float16 dequantization reproduces exactly (see the module docstring).
        config: a full ``Flux2Config`` instead of a tiny one (benchmarks).

    Returns:
        The written file.
    """
    g = _gguf()
    cfg = config or tiny_config(variant, depth, depth_single, context_dim)
    path = Path(path)
    file = path if path.suffix == ".gguf" else path / f"{FILE_NAMES[variant]}-{mix}.gguf"
    file.parent.mkdir(parents=True, exist_ok=True)
    sd = random_bfl_state_dict(cfg, seed) if config is None else None
    specs, n_quant = [], 0
    for name, shape in bfl_shapes(cfg).items():
        storage = storage_for(name, shape, mix, n_quant)
        n_quant += GGML_TYPES[storage].quantized
        specs.append((name, shape, storage))

    def data(i: int, name: str, shape: tuple[int, ...], storage: str):
        # One generator per tensor: the data pass can make each tensor on its own, in order.
        rng = np.random.default_rng([seed, i])
        if sd is not None:
            w = sd[name]
        elif storage in ("F32", "F16", "BF16"):  # full size: norms ~1, small matrices ~N(0, 1/fan_in)
            w = torch.from_numpy(rng.standard_normal(shape, dtype=np.float32)) / math.sqrt(shape[-1])
            w = 1 + 0.1 * w if name.endswith(".scale") else w
        else:  # full-size quantized: only the spread matters
            w = torch.tensor([1.0, -1.0]) / math.sqrt(shape[-1])
        if GGML_TYPES[storage].quantized:
            rows = math.prod(shape[:-1])
            raw = random_quant_blocks(
                storage, rows, shape[-1], float(w.std()), rng, exact_fp16, None if sd is not None else 64
            )
            return raw.reshape(*shape[:-1], -1), g.GGMLQuantizationType[storage]
        return _store(name, shape, storage, w, rng, exact_fp16)

    writer = g.GGUFWriter(str(file), arch)
    writer.add_string("general.name", f"flux2 {variant} random")
    writer.add_uint32("general.quantization_version", 2)
    pre = "model.diffusion_model." if prefix else ""
    for name, shape, storage in specs:
        q = GGML_TYPES[storage]
        if q.quantized:
            stored, dtype = (*shape[:-1], q.row_bytes(shape[-1])), np.uint8
        elif storage == "BF16":  # written as its raw bytes
            stored, dtype = (*shape[:-1], 2 * shape[-1]), np.uint8
        else:
            stored, dtype = shape, {"F32": np.float32, "F16": np.float16}[storage]
        raw = None if storage in ("F32", "F16") else g.GGMLQuantizationType[storage]
        nbytes = math.prod(stored) * np.dtype(dtype).itemsize
        writer.add_tensor_info(pre + name, stored, np.dtype(dtype), nbytes, raw_dtype=raw)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for i, (name, shape, storage) in enumerate(specs):
        arr, _ = data(i, name, shape, storage)
        writer.write_tensor_data(np.ascontiguousarray(arr))
    writer.close()
    return file


def reference_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Every tensor of a GGUF dequantized by the ``gguf`` package's numpy decoders (float32, PyTorch
    shapes, names as stored): the independent reference the loaders are tested against."""
    g = _gguf()
    reader = g.GGUFReader(str(path))
    out = {}
    for t in reader.tensors:
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))
        values = g.quants.dequantize(np.asarray(t.data), t.tensor_type)
        out[t.name] = torch.from_numpy(np.array(values, dtype=np.float32, copy=True)).reshape(shape)
    return out


# ------------------------------------------------------------------------------------ text encoders
# transformers name (after "model.") -> llama.cpp name; "{i}" is the decoder layer.
_LLAMA_NAMES = (
    ("embed_tokens.weight", "token_embd.weight"),
    ("norm.weight", "output_norm.weight"),
    ("layers.{i}.input_layernorm.weight", "blk.{i}.attn_norm.weight"),
    ("layers.{i}.self_attn.q_proj.weight", "blk.{i}.attn_q.weight"),
    ("layers.{i}.self_attn.k_proj.weight", "blk.{i}.attn_k.weight"),
    ("layers.{i}.self_attn.v_proj.weight", "blk.{i}.attn_v.weight"),
    ("layers.{i}.self_attn.o_proj.weight", "blk.{i}.attn_output.weight"),
    ("layers.{i}.self_attn.q_norm.weight", "blk.{i}.attn_q_norm.weight"),
    ("layers.{i}.self_attn.k_norm.weight", "blk.{i}.attn_k_norm.weight"),
    ("layers.{i}.post_attention_layernorm.weight", "blk.{i}.ffn_norm.weight"),
    ("layers.{i}.mlp.gate_proj.weight", "blk.{i}.ffn_gate.weight"),
    ("layers.{i}.mlp.up_proj.weight", "blk.{i}.ffn_up.weight"),
    ("layers.{i}.mlp.down_proj.weight", "blk.{i}.ffn_down.weight"),
)


def llama_cpp_permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """What llama.cpp's converter does to Q/K rows for its interleaved rotary layout (llama arch)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _llama_name(hf: str) -> str | None:
    m = re.match(r"model\.layers\.(\d+)\.(.+)$", hf)
    rest = hf[len("model.") :] if m is None else f"layers.{{i}}.{m.group(2)}"
    for ours, theirs in _LLAMA_NAMES:
        if ours == rest:
            return theirs.replace("{i}", m.group(1)) if m else theirs
    return "output.weight" if hf == "lm_head.weight" else None


def _qwen_vocab(tokenizer_json: Path):
    """(tokens, token types, merges) as llama.cpp writes them for a Qwen2/3 tokenizer.json."""
    tj = json.loads(tokenizer_json.read_text(encoding="utf-8"))
    vocab = dict(tj["model"]["vocab"])
    added = {t["id"]: t for t in tj.get("added_tokens", [])}
    merges = [m if isinstance(m, str) else " ".join(m) for m in tj["model"]["merges"]]
    size = 151936
    by_id = {i: s for s, i in vocab.items()}
    tokens, types = [], []
    for i in range(size):
        if i in added:
            tokens.append(added[i]["content"])
            types.append(3 if added[i].get("special") else 4)  # CONTROL / USER_DEFINED
        elif i in by_id:
            tokens.append(by_id[i])
            types.append(1)  # NORMAL
        else:
            tokens.append(f"[PAD{i}]")
            types.append(5)  # UNUSED
    return tokens, types, merges


def _tekken_vocab(tekken_json: Path, vocab_size: int):
    """(tokens, token types) as llama.cpp writes them for a Mistral tekken tokenizer: the control
    tokens first, then the byte tokens in rank order as byte-level unicode strings."""
    import base64

    from ..text_encoders.tokenizer import _to_unicode

    tk = json.loads(tekken_json.read_text(encoding="utf-8"))
    n_special = int(tk["config"].get("default_num_special_tokens") or len(tk["special_tokens"]))
    names = {int(s["rank"]): s["token_str"] for s in tk["special_tokens"]}
    tokens = [names.get(i, f"<SPECIAL_{i}>") for i in range(n_special)]
    types = [3] * n_special
    for e in tk["vocab"][: vocab_size - n_special]:
        tokens.append(_to_unicode(base64.b64decode(e["token_bytes"])))
        types.append(1)
    return tokens, types


def write_tiny_gguf_text_encoder(
    path: str | os.PathLike,
    kind: str = "qwen3-4b",
    mix: str = "Q8_0",
    arch: str | None = None,
    seed: int = 0,
    tokenizer: str | os.PathLike | None = None,
    with_tokenizer: bool = True,
) -> Path:
    """Write a tiny random text encoder GGUF in llama.cpp's layout.

    Args:
        path: the ``.gguf`` file.
        kind: "qwen3-4b", "qwen3-8b" or "mistral3" (weights of ``tiny_reference_model``).
        mix: storage rule (a key of ``MIXES`` or "mixed"); norms and small tensors stay F32.
        arch: ``general.architecture``: "qwen3" for Qwen3; "llama" (default) or "mistral3" for Mistral.
        seed: weight seed (same weights as the safetensors tiny encoders of this seed).
        tokenizer: Qwen3 ``tokenizer.json`` (or its folder) / Mistral ``tekken.json``; default the
            test assets in ``$FLUX2LOCAL_ASSETS``.
        with_tokenizer: write the ``tokenizer.ggml.*`` fields (False makes a file the loader refuses).

    Returns:
        ``path``.
    """
    from .text_encoder import _default_tokenizer, _normalise_kind, tiny_reference_model

    g = _gguf()
    kind = _normalise_kind(kind, path)
    arch = arch or ("llama" if kind == "mistral3" else "qwen3")
    model = tiny_reference_model(kind, seed)
    cfg = model.config.text_config if kind == "mistral3" else model.config
    sd = model.state_dict()
    if kind == "mistral3":
        sd = {"model." + k[len("model.language_model.") :]: v for k, v in sd.items() if "language_model" in k}
    else:
        sd = {k: v for k, v in sd.items() if k.startswith("model.")}
    if not cfg.tie_word_embeddings:
        sd["lm_head.weight"] = model.state_dict()["lm_head.weight"]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    writer = g.GGUFWriter(str(path), arch)
    writer.add_string("general.name", f"{kind} tiny random")
    writer.add_uint32("general.quantization_version", 2)
    writer.add_uint32(f"{arch}.block_count", cfg.num_hidden_layers)
    writer.add_uint32(f"{arch}.context_length", cfg.max_position_embeddings)
    writer.add_uint32(f"{arch}.embedding_length", cfg.hidden_size)
    writer.add_uint32(f"{arch}.feed_forward_length", cfg.intermediate_size)
    writer.add_uint32(f"{arch}.attention.head_count", cfg.num_attention_heads)
    writer.add_uint32(f"{arch}.attention.head_count_kv", cfg.num_key_value_heads)
    writer.add_uint32(f"{arch}.attention.key_length", cfg.head_dim)
    writer.add_uint32(f"{arch}.attention.value_length", cfg.head_dim)
    theta = getattr(cfg, "rope_theta", None) or (cfg.rope_parameters or {}).get("rope_theta")
    writer.add_float32(f"{arch}.rope.freq_base", float(theta))
    writer.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", float(cfg.rms_norm_eps))
    if with_tokenizer:
        tok = Path(tokenizer) if tokenizer is not None else _default_tokenizer(kind)
        if tok is None:
            raise FileNotFoundError(
                "a tokenizer is needed: run .ci/env.sh (FLUX2LOCAL_ASSETS) or pass tokenizer="
            )
        writer.add_string("tokenizer.ggml.model", "gpt2")
        if kind == "mistral3":
            tokens, types = _tekken_vocab(tok, cfg.vocab_size)
            writer.add_string("tokenizer.ggml.pre", "tekken")
            writer.add_uint32("tokenizer.ggml.bos_token_id", 1)
            writer.add_uint32("tokenizer.ggml.eos_token_id", 2)
            writer.add_uint32("tokenizer.ggml.padding_token_id", 11)
        else:
            tokens, types, merges = _qwen_vocab(tok / "tokenizer.json" if tok.is_dir() else tok)
            writer.add_string("tokenizer.ggml.pre", "qwen2")
            writer.add_token_merges(merges)
            writer.add_uint32("tokenizer.ggml.eos_token_id", 151645)
            writer.add_uint32("tokenizer.ggml.padding_token_id", 151643)
            writer.add_uint32("tokenizer.ggml.bos_token_id", 151643)
        writer.add_token_list(tokens)
        writer.add_token_types(types)
    n_quant = 0
    for hf, w in sorted(sd.items()):
        name = _llama_name(hf)
        if name is None:
            continue
        if arch in ("llama", "mistral3") and name.endswith(("attn_q.weight", "attn_k.weight")):
            heads = cfg.num_attention_heads if "attn_q" in name else cfg.num_key_value_heads
            w = llama_cpp_permute(w, heads)
        shape = tuple(w.shape)
        storage = storage_for(name, shape, mix, n_quant)
        n_quant += GGML_TYPES[storage].quantized
        if GGML_TYPES[storage].quantized:
            data, raw_dtype = _requantize_like(w, storage, rng), g.GGMLQuantizationType[storage]
        else:
            data, raw_dtype = _store(name, shape, storage, w, rng, False)
        writer.add_tensor(name, data, raw_dtype=raw_dtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _requantize_like(w: torch.Tensor, storage: str, rng) -> np.ndarray:
    """Stored bytes of ``w`` in ``storage``: gguf's own quantizer where it has one (the text encoder's
    weights stay close to the tiny reference model), random blocks of the same spread otherwise."""
    g = _gguf()
    qt = g.GGMLQuantizationType[storage]
    try:
        return g.quants.quantize(w.float().numpy(), qt)
    except (NotImplementedError, g.quants.QuantError):
        return random_quant_blocks(storage, w.shape[0], w.shape[1], float(w.float().std()), rng)
