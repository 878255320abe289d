"""Text encoders in llama.cpp's GGUF layout (Qwen3 4B/8B, Mistral Small 3.x as "llama" or "mistral3").

llama.cpp's ``convert_hf_to_gguf.py`` renames the decoder (``model.layers.N.self_attn.q_proj`` ->
``blk.N.attn_q`` ...), stores hyper-parameters as ``<arch>.*`` fields and the tokenizer as
``tokenizer.ggml.*`` fields. For architectures whose rotary embedding llama.cpp applies to
adjacent pairs ("llama", "mistral3"), it permutes the rows of the Q and K projections; Hugging
Face models rotate the two halves of each head, so the permutation is undone here. Qwen3 uses the
half-rotation ("neox") layout and is stored unpermuted. A GGUF row holds one output feature, so
the permutation is undone on the stored bytes, quantized or not.

``GGUFTextReader`` shows the file under Hugging Face names (``model.layers.3.mlp.up_proj.weight``)
with the ``CheckpointReader`` interface, so the text-encoder loader treats it like any other file.
"""

from __future__ import annotations

import base64
import logging
import re

import torch

from ..checkpoint.gguf_file import GGUFFile
from ..checkpoint.identify import FLUX2_TEXT_ENCODER, identify, wrong_model
from ..errors import CheckpointError
from .layout import _TE_FIX as TE_FIX
from .layout import TextEncoderLayout
from .spec import DECODER_PRESETS, MISTRAL3, MISTRAL3_SPECIAL_IDS, QWEN3, QWEN3_PAD_ID, DecoderShape

logger = logging.getLogger(__name__)

# general.architecture -> encoder kind.
GGUF_ARCHS = {"qwen3": QWEN3, "llama": MISTRAL3, "mistral3": MISTRAL3}
# Architectures whose Q/K rows llama.cpp permutes for its adjacent-pair rotary layout.
_PERMUTED_ARCHS = {"llama", "mistral3"}

# llama.cpp tensor name -> Hugging Face name ("{i}" = decoder layer).
_NAMES = (
    ("token_embd.weight", "model.embed_tokens.weight"),
    ("output_norm.weight", "model.norm.weight"),
    ("output.weight", "lm_head.weight"),
    ("blk.{i}.attn_norm.weight", "model.layers.{i}.input_layernorm.weight"),
    ("blk.{i}.attn_q.weight", "model.layers.{i}.self_attn.q_proj.weight"),
    ("blk.{i}.attn_k.weight", "model.layers.{i}.self_attn.k_proj.weight"),
    ("blk.{i}.attn_v.weight", "model.layers.{i}.self_attn.v_proj.weight"),
    ("blk.{i}.attn_output.weight", "model.layers.{i}.self_attn.o_proj.weight"),
    ("blk.{i}.attn_q_norm.weight", "model.layers.{i}.self_attn.q_norm.weight"),
    ("blk.{i}.attn_k_norm.weight", "model.layers.{i}.self_attn.k_norm.weight"),
    ("blk.{i}.ffn_norm.weight", "model.layers.{i}.post_attention_layernorm.weight"),
    ("blk.{i}.ffn_gate.weight", "model.layers.{i}.mlp.gate_proj.weight"),
    ("blk.{i}.ffn_up.weight", "model.layers.{i}.mlp.up_proj.weight"),
    ("blk.{i}.ffn_down.weight", "model.layers.{i}.mlp.down_proj.weight"),
)
_PATTERNS = [(re.compile("^" + re.escape(g).replace(r"\{i\}", r"(\d+)") + "$"), hf) for g, hf in _NAMES]

_FIX = (
    "Choose a FLUX.2 text encoder GGUF: Qwen3-4B / Qwen3-8B (llama.cpp 'qwen3') for [klein], "
    "Mistral Small 3.x 24B ('llama' or 'mistral3') for [dev]."
)


def hf_name(gguf_name: str) -> str | None:
    """The Hugging Face name of a llama.cpp tensor name, or None for tensors FLUX.2 does not use."""
    for pat, hf in _PATTERNS:
        m = pat.match(gguf_name)
        if m:
            return hf.replace("{i}", m.group(1)) if m.groups() else hf
    return None


def unpermute_rows(t: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undo llama.cpp's Q/K row permutation: rows (head, pair, 2) -> (head, 2, pair), any row width."""
    rows = t.shape[0]
    return t.reshape(n_head, rows // n_head // 2, 2, *t.shape[1:]).transpose(1, 2).reshape(t.shape)


class GGUFTextReader:
    """A llama.cpp text-model GGUF under Hugging Face names, with the ``CheckpointReader`` interface.

    Quantized tensors come back as stored bytes (``dtype`` uint8); Q/K rows are un-permuted on the
    way out where the architecture needs it.
    """

    def __init__(self, file: GGUFFile):
        self.file = file
        self.path = file.path
        self.files = [file]
        self.metadata: dict[str, str] = {}
        self.arch = file.architecture
        self._names = {}
        for k in file.keys():
            hf = hf_name(k)
            if hf is not None:
                self._names[hf] = k
        self._heads = {
            "q_proj": file.field(f"{self.arch}.attention.head_count"),
            "k_proj": file.field(f"{self.arch}.attention.head_count_kv"),
        }

    def keys(self) -> list[str]:
        return list(self._names)

    def __contains__(self, key: object) -> bool:
        return key in self._names

    def __iter__(self):
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)

    def gguf_key(self, key: str) -> str:
        try:
            return self._names[key]
        except KeyError:
            raise CheckpointError(self.path, f"has no tensor for '{key}'.") from None

    def shape(self, key: str) -> tuple[int, ...]:
        return self.file.shape(self.gguf_key(key))

    def dtype(self, key: str) -> torch.dtype:
        return self.file.dtype(self.gguf_key(key))

    def storage(self, key: str) -> str:
        return self.file.storage(self.gguf_key(key))

    def ggml(self, key: str):
        return self.file.ggml(self.gguf_key(key))

    def is_quantized(self, key: str) -> bool:
        return self.file.is_quantized(self.gguf_key(key))

    def nbytes(self, key: str) -> int:
        return self.file.nbytes(self.gguf_key(key))

    def _permuted_heads(self, key: str) -> int | None:
        if self.arch not in _PERMUTED_ARCHS:
            return None
        m = re.search(r"\.self_attn\.(q_proj|k_proj)\.weight$", key)
        return int(self._heads[m.group(1)]) if m else None

    def get(self, key: str) -> torch.Tensor:
        """The stored tensor (typed, or (rows, bytes) uint8), rows in Hugging Face order."""
        t = self.file.get(self.gguf_key(key))
        heads = self._permuted_heads(key)
        return t if heads is None else unpermute_rows(t, heads)

    def dequantize(self, key: str, dtype: torch.dtype, device: torch.device | str = "cpu") -> torch.Tensor:
        from ..quant.ggml import dequantize_ggml

        t, q = self.get(key).to(device), self.ggml(key)
        return dequantize_ggml(t, q, self.shape(key), dtype) if q.quantized else t.to(dtype)

    def read_into(self, key: str, out: torch.Tensor) -> torch.Tensor:
        return out.copy_(self.get(key))


def _field(file: GGUFFile, arch: str, name: str, default=None):
    return file.field(f"{arch}.{name}", default)


def detect_gguf_layout(reader: GGUFTextReader) -> TextEncoderLayout:
    """The ``TextEncoderLayout`` of a llama.cpp text-encoder GGUF, from its fields and shapes.

    Raises:
        CheckpointError: another architecture, a foreign vocabulary, or missing decoder tensors.
    """
    file, arch, path = reader.file, reader.arch, reader.path
    kind = GGUF_ARCHS.get(arch or "")
    if kind is None:
        found = identify(file.keys(), file.shape, arch)
        raise wrong_model(
            path,
            None if found is None or found.key == FLUX2_TEXT_ENCODER else found,
            "a Mistral Small 3.x or Qwen3 text encoder",
            _FIX + " " + TE_FIX,
            f"GGUF architecture '{arch}'",
        )
    for need in ("model.embed_tokens.weight", "model.layers.0.self_attn.k_proj.weight"):
        if need not in reader:
            raise CheckpointError(
                path, f"is a '{arch}' GGUF without '{reader_name(need)}': it is incomplete.", _FIX
            )
    vocab, hidden = reader.shape("model.embed_tokens.weight")
    preset = DECODER_PRESETS["mistral-small-3.2-24b" if kind == MISTRAL3 else "qwen3-4b"]
    if vocab != preset.vocab_size:
        family = "Mistral Small 3.x" if kind == MISTRAL3 else "Qwen3"
        raise CheckpointError(
            path,
            f"is a '{arch}' language model with a {vocab}-token vocabulary, not {family} ({preset.vocab_size}).",
            _FIX,
        )
    heads = int(_field(file, arch, "attention.head_count", 0))
    q_out = reader.shape("model.layers.0.self_attn.q_proj.weight")[0]
    kv_out = reader.shape("model.layers.0.self_attn.k_proj.weight")[0]
    head_dim = int(_field(file, arch, "attention.key_length", 0) or (q_out // heads if heads else 128))
    n_layers = int(_field(file, arch, "block_count", 0)) or _count_layers(reader)
    shape = DecoderShape(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=reader.shape("model.layers.0.mlp.gate_proj.weight")[0],
        num_hidden_layers=n_layers,
        num_attention_heads=q_out // head_dim,
        num_key_value_heads=kv_out // head_dim,
        head_dim=head_dim,
        rope_theta=float(_field(file, arch, "rope.freq_base", preset.rope_theta)),
        rms_norm_eps=float(_field(file, arch, "attention.layer_norm_rms_epsilon", preset.rms_norm_eps)),
        max_position_embeddings=int(_field(file, arch, "context_length", preset.max_position_embeddings)),
        tie_word_embeddings="lm_head.weight" not in reader,
    )
    present = _count_layers(reader)
    if present != n_layers:
        raise CheckpointError(
            path, f"declares {n_layers} decoder layers but holds {present}: it is incomplete.", _FIX
        )
    return TextEncoderLayout(
        kind=kind,
        name=f"gguf-{arch}",
        rules=(("model.", "model."), ("lm_head.", "lm_head.")),
        shape=shape,
        quant="gguf",
        has_lm_head="lm_head.weight" in reader,
    )


def reader_name(hf: str) -> str:
    """The llama.cpp name of a Hugging Face name (for messages)."""
    for g, h in _NAMES:
        pat = re.compile("^" + re.escape(h).replace(r"\{i\}", r"(\d+)") + "$")
        m = pat.match(hf)
        if m:
            return g.replace("{i}", m.group(1)) if m.groups() else g
    return hf


def _count_layers(reader: GGUFTextReader) -> int:
    from ..checkpoint.keys import count_blocks

    try:
        return count_blocks(reader.keys(), "model.layers.", require_contiguous=True)
    except ValueError as e:
        raise CheckpointError(reader.path, f"is incomplete: {e}.", "Download the file again.") from None


# ------------------------------------------------------------------------------------- tokenizer
# Mistral's tekken pre-tokenizer split (the "pattern" of tekken.json v7, which llama.cpp also uses
# for its "tekken" pre-tokenizer); GGUFs carry the tokens but not the pattern.
TEKKEN_PATTERN = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+|[^\r\n\p{L}\p{N}]?"
    r"[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_CONTROL, _USER_DEFINED = 3, 4
_TOKENIZER_FIX = (
    "Use a GGUF converted with llama.cpp's convert_hf_to_gguf.py (it embeds the tokenizer), or pass the "
    "model's tokenizer files explicitly."
)


def _byte_decoder() -> dict[str, int]:
    from .tokenizer import _byte_to_unicode

    return {c: b for b, c in _byte_to_unicode().items()}


def _tekken_from_gguf(tokens: list[str], types: list[int], path: str):
    """Mistral: rebuild tekken JSON (control tokens first, then byte tokens by rank) -> Tokenizer."""
    from .tokenizer import tekken_tokenizer

    n_special = 0
    while n_special < len(types) and types[n_special] == _CONTROL:
        n_special += 1
    decoder = _byte_decoder()
    vocab = []
    for tok in tokens[n_special:]:
        try:
            raw = bytes(decoder[c] for c in tok)
        except KeyError:
            raise CheckpointError(
                path,
                f"has a token {tok!r} that is not byte-level BPE: not a tekken tokenizer.",
                _TOKENIZER_FIX,
            ) from None
        vocab.append({"rank": len(vocab), "token_bytes": base64.b64encode(raw).decode("ascii")})
    data = {
        "config": {
            "pattern": TEKKEN_PATTERN,
            "default_num_special_tokens": n_special,
            "default_vocab_size": len(tokens),
            "num_vocab_tokens": len(vocab),
        },
        "vocab": vocab,
        "special_tokens": [{"rank": i, "token_str": tokens[i], "is_control": True} for i in range(n_special)],
    }
    return tekken_tokenizer(data, path)


def _qwen_from_gguf(tokens: list[str], types: list[int], merges: list[str], path: str):
    """Qwen3: byte-level BPE from the GGUF's tokens and merges (control tokens added as specials)."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

    from .tokenizer import _QWEN_PATTERN

    added = [(i, t) for i, (t, ty) in enumerate(zip(tokens, types)) if ty in (_CONTROL, _USER_DEFINED)]
    added_ids = {i for i, _ in added}
    vocab = {t: i for i, (t, ty) in enumerate(zip(tokens, types)) if i not in added_ids and ty == 1}
    pairs = [tuple(m.split(" ", 1)) for m in merges]
    try:
        tok = Tokenizer(models.BPE(vocab=vocab, merges=pairs, fuse_unk=False))
    except Exception as e:  # tokenizers raises its own error types for inconsistent vocab/merges
        raise CheckpointError(
            path, f"has tokenizer fields that do not form a BPE ({e}).", _TOKENIZER_FIX
        ) from None
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_QWEN_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    # Added tokens keep their GGUF ids: they follow the regular vocabulary in id order.
    tok.add_tokens([AddedToken(t, special=types[i] == _CONTROL, normalized=False) for i, t in sorted(added)])
    return tok


_TOKENIZER_CACHE: dict[tuple, object] = {}


def gguf_prompt_tokenizer(file: GGUFFile, kind: str):
    """The encoder's ``PromptTokenizer`` rebuilt from the GGUF's ``tokenizer.ggml.*`` fields.

    Rebuilding tekken's merges takes about a second, so tokenizers are reused while the file is
    unchanged (same path, size and modification time).

    Raises:
        CheckpointError: no tokenizer fields, another tokenizer model, or ids that differ from the
            ones FLUX.2 was trained with (the same checks as for Hugging Face tokenizer files).
    """
    import os

    path = file.path
    st = os.stat(path)
    key = (os.path.realpath(path), st.st_size, st.st_mtime_ns, kind)
    if key not in _TOKENIZER_CACHE:
        if len(_TOKENIZER_CACHE) >= 4:
            _TOKENIZER_CACHE.pop(next(iter(_TOKENIZER_CACHE)))
        _TOKENIZER_CACHE[key] = _build_prompt_tokenizer(file, kind)
    return _TOKENIZER_CACHE[key]


def _build_prompt_tokenizer(file: GGUFFile, kind: str):
    from .tokenizer import PromptTokenizer

    path = file.path
    tokens = file.field("tokenizer.ggml.tokens")
    types = file.field("tokenizer.ggml.token_type")
    model = file.field("tokenizer.ggml.model")
    if not tokens or not types:
        raise CheckpointError(
            path,
            "carries no tokenizer (no 'tokenizer.ggml.tokens' / 'tokenizer.ggml.token_type' fields).",
            _TOKENIZER_FIX,
        )
    if model != "gpt2":
        raise CheckpointError(
            path, f"has a '{model}' tokenizer; FLUX.2's encoders use byte-level BPE ('gpt2').", _TOKENIZER_FIX
        )
    if kind == MISTRAL3:
        tok = _tekken_from_gguf(tokens, types, path)
    else:
        merges = file.field("tokenizer.ggml.merges")
        if not merges:
            raise CheckpointError(
                path, "has a Qwen3 tokenizer without 'tokenizer.ggml.merges'.", _TOKENIZER_FIX
            )
        tok = _qwen_from_gguf(tokens, types, merges, path)
    check_tokenizer_ids(kind, tok, path)
    return PromptTokenizer(kind, tok, f"{path} (GGUF tokenizer)")


def check_tokenizer_ids(kind: str, tokenizer, path: str) -> None:
    """The control-token ids FLUX.2's templates use must be where the trained encoder expects them."""
    if kind == MISTRAL3:
        wanted = dict(MISTRAL3_SPECIAL_IDS)
    else:
        wanted = {
            "<|endoftext|>": QWEN3_PAD_ID,
            "<|im_start|>": QWEN3_PAD_ID + 1,
            "<|im_end|>": QWEN3_PAD_ID + 2,
        }
    wrong = {name: idx for name, idx in wanted.items() if tokenizer.token_to_id(name) != idx}
    if wrong:
        found = {n: tokenizer.token_to_id(n) for n in wrong}
        raise CheckpointError(
            path,
            f"has a tokenizer whose control tokens sit at other ids than the encoder was trained with "
            f"(expected {wrong}, found {found}).",
            _TOKENIZER_FIX,
        )
