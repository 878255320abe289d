"""Tokenizers of the FLUX.2 text encoders and the prompt templates they are fed.

- Mistral Small 3.x uses "tekken", a tiktoken-style byte-level BPE stored as JSON (``tekken.json``;
  ComfyUI embeds the same JSON bytes in its text-encoder files as a uint8 tensor ``tekken_model``).
  It is turned into a Hugging Face ``tokenizers.Tokenizer`` here: ranks become a vocab, and each
  token's merge is recovered by running BPE on its own bytes with only lower ranks allowed.
- Qwen3 uses a byte-level BPE from ``tokenizer.json`` or ``vocab.json`` + ``merges.txt``.

Templates are rendered as ids the way the reference chat templates do: control tokens are inserted
as ids (Mistral) or parsed from the template text (Qwen3), never from the user's text for Mistral.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

from ..errors import CheckpointError
from .spec import MISTRAL3, MISTRAL3_SPECIAL_IDS, QWEN3, QWEN3_PAD_ID, QWEN3_TEMPLATE

logger = logging.getLogger(__name__)

# Qwen2/Qwen3 pre-tokenizer split (from the published tokenizer.json).
_QWEN_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# Control tokens of Qwen3 (ids 151643-151668), used when only vocab.json + merges.txt are given.
_QWEN_SPECIALS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
    "<tool_call>",
    "</tool_call>",
    "<|fim_prefix|>",
    "<|fim_middle|>",
    "<|fim_suffix|>",
    "<|fim_pad|>",
    "<|repo_name|>",
    "<|file_sep|>",
    "<tool_response>",
    "</tool_response>",
    "<think>",
    "</think>",
]


@lru_cache(maxsize=1)
def _byte_to_unicode() -> dict[int, str]:
    """Byte-level BPE alphabet: printable bytes map to themselves, the rest to code points >= 256."""
    keep = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    table = {b: chr(b) for b in keep}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def _to_unicode(token: bytes) -> str:
    table = _byte_to_unicode()
    return "".join(table[b] for b in token)


def _bpe_parts(ranks: dict[bytes, int], token: bytes, max_rank: int) -> list[bytes]:
    """Byte-level BPE of ``token`` using only merges whose result ranks below ``max_rank``."""
    parts = [token[i : i + 1] for i in range(len(token))]
    while len(parts) > 1:
        best, best_rank = -1, max_rank
        for i in range(len(parts) - 1):
            r = ranks.get(parts[i] + parts[i + 1])
            if r is not None and r < best_rank:
                best, best_rank = i, r
        if best < 0:
            break
        parts[best : best + 2] = [parts[best] + parts[best + 1]]
    return parts


def tekken_tokenizer(data: bytes | str | dict, source: str = "tekken.json") -> Tokenizer:
    """Build a ``tokenizers.Tokenizer`` from Mistral tekken JSON.

    Args:
        data: the JSON bytes/text or the parsed dict.
        source: where it came from, for error messages.

    Returns:
        A tokenizer whose ids equal mistral-common's (control tokens occupy the first ids).

    Raises:
        CheckpointError: not a tekken JSON.
    """
    try:
        tk = json.loads(data) if isinstance(data, (bytes, str)) else data
        cfg = tk["config"]
        n_special = int(cfg.get("default_num_special_tokens") or len(tk["special_tokens"]))
        vocab_size = int(cfg.get("default_vocab_size") or (n_special + len(tk["vocab"])))
        pattern = cfg["pattern"]
        entries = tk["vocab"][: vocab_size - n_special]
        ranked = [base64.b64decode(e["token_bytes"]) for e in entries]
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(
            source,
            f"is not a Mistral tekken tokenizer JSON ({type(e).__name__}: {e}).",
            "Use the tekken.json of Mistral Small 3.x.",
        ) from None
    ranks = {b: i for i, b in enumerate(ranked)}
    vocab = {_to_unicode(b): i + n_special for i, b in enumerate(ranked)}
    merges = []
    for rank, token in enumerate(ranked):
        if len(token) > 1:
            parts = _bpe_parts(ranks, token, rank)
            if len(parts) == 2:
                merges.append((_to_unicode(parts[0]), _to_unicode(parts[1])))
    names = {int(t["rank"]): t["token_str"] for t in tk.get("special_tokens", [])}
    for name, idx in MISTRAL3_SPECIAL_IDS.items():
        names.setdefault(idx, name)
    specials = [names.get(i, f"<SPECIAL_{i}>") for i in range(n_special)]
    for i, s in enumerate(specials):
        vocab[s] = i
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, ignore_merges=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    return tok


def qwen_tokenizer_from_vocab(vocab_path: str | os.PathLike, merges_path: str | os.PathLike) -> Tokenizer:
    """Qwen2/Qwen3 byte-level BPE from ``vocab.json`` + ``merges.txt`` (control tokens added at 151643+)."""
    bpe = models.BPE.from_file(os.fspath(vocab_path), os.fspath(merges_path), fuse_unk=False)
    tok = Tokenizer(bpe)
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_QWEN_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    n = tok.get_vocab_size(with_added_tokens=False)
    if n != QWEN3_PAD_ID:
        raise CheckpointError(
            vocab_path,
            f"has {n} entries; the Qwen3 vocabulary has {QWEN3_PAD_ID}.",
            "Use the vocab.json and merges.txt of Qwen2.5/Qwen3.",
        )
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in _QWEN_SPECIALS])
    return tok


# A prompt longer than this many characters per wanted token is first tokenized from a prefix
# (real text averages about 4 characters per token; the prefix grows 4x while it falls short).
_FIRST_PREFIX_CHARS_PER_TOKEN = 16
# Ids past the wanted ones that the prefix must also give: the word the cut falls in may tokenize
# differently from its whole, and that must stay beyond the ids that are kept.
_CUT_MARGIN_TOKENS = 64


class PromptTokenizer:
    """Renders FLUX.2 prompts (and upsampling chats) into token ids for one encoder family.

    Args:
        kind: ``"mistral3"`` or ``"qwen3"``.
        tokenizer: the underlying ``tokenizers.Tokenizer``.
        source: where it was loaded from (for messages).
        identity: SHA-256 (hex) of the bytes it was built from (for cache keys: a file replaced
            under the same name is another tokenizer, identical bytes elsewhere the same one);
            by default a digest of the tokenizer's own serialisation.
    """

    def __init__(self, kind: str, tokenizer: Tokenizer, source: str, identity: str | None = None):
        self.kind = kind
        self.tokenizer = tokenizer
        self.source = source
        self.identity = identity or hashlib.sha256(tokenizer.to_str().encode()).hexdigest()
        if kind == MISTRAL3:
            # mistral-common never parses control tokens out of text: "[INST]" typed in a prompt is text.
            tokenizer.encode_special_tokens = True
            self.eos_ids = {MISTRAL3_SPECIAL_IDS["</s>"]}
        else:
            self.eos_ids = {self.special_id("<|im_end|>"), self.special_id("<|endoftext|>")}

    def special_id(self, name: str) -> int:
        if self.kind == MISTRAL3 and name in MISTRAL3_SPECIAL_IDS:
            return MISTRAL3_SPECIAL_IDS[name]
        idx = self.tokenizer.token_to_id(name)
        if idx is None:
            raise CheckpointError(
                self.source, f"has no '{name}' token.", "Use the tokenizer of the encoder model."
            )
        return idx

    def text_ids(self, text: str) -> list[int]:
        """Ids of plain text (no BOS). Mistral never parses control tokens out of user text."""
        return self.tokenizer.encode(text, add_special_tokens=False).ids if text else []

    def prompt_ids(self, prompt: str, system: str | None = None, max_length: int | None = None) -> list[int]:
        """Unpadded ids of the FLUX.2 encoder input for ``prompt``.

        Mistral: ``<s>[SYSTEM_PROMPT]{system}[/SYSTEM_PROMPT][INST]{prompt}[/INST]`` with "[IMG]" removed
        from the prompt; Qwen3: the no-thinking chat template with one user turn.

        Args:
            prompt: the user's prompt.
            system: Mistral's system prompt (default: FLUX.2's).
            max_length: the caller keeps only this many ids. A longer prompt is then tokenized from
                a growing prefix until that gives more ids than needed (plus a margin for the word
                the cut falls in), so a huge prompt costs what its first tokens cost; the first
                ``max_length`` ids are those of the whole prompt. More than ``max_length`` ids are
                returned whenever the prompt is longer (the caller truncates and can warn).
        """
        if max_length is None:
            return self._prompt_ids(prompt, system)
        chars = _FIRST_PREFIX_CHARS_PER_TOKEN * max_length
        while chars < len(prompt):
            ids = self._prompt_ids(prompt[:chars], system)
            if len(ids) > max_length + _CUT_MARGIN_TOKENS:
                return ids
            chars *= 4
        return self._prompt_ids(prompt, system)

    def _prompt_ids(self, prompt: str, system: str | None) -> list[int]:
        if self.kind == MISTRAL3:
            from .spec import MISTRAL3_SYSTEM_PROMPT

            sp = MISTRAL3_SPECIAL_IDS
            return (
                [sp["<s>"], sp["[SYSTEM_PROMPT]"]]
                + self.text_ids(system or MISTRAL3_SYSTEM_PROMPT)
                + [sp["[/SYSTEM_PROMPT]"], sp["[INST]"]]
                + self.text_ids(prompt.replace("[IMG]", ""))
                + [sp["[/INST]"]]
            )
        text = QWEN3_TEMPLATE.format(prompt)
        if system:
            text = f"<|im_start|>system\n{system}<|im_end|>\n" + text
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def chat_ids(
        self, system: str, user: str, image_token_grids: list[tuple[int, int]] | None = None
    ) -> list[int]:
        """Ids of a system + user chat ending where the assistant answer starts (for generation).

        Args:
            system: system prompt.
            user: user message.
            image_token_grids: Mistral only: (rows, cols) of image tokens per image, placed before the text.
        """
        if self.kind == QWEN3:
            text = (
                f"<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n{user}<|im_end|>\n"
                "<|im_start|>assistant\n<think>\n\n</think>\n\n"
            )
            return self.tokenizer.encode(text, add_special_tokens=False).ids
        sp = MISTRAL3_SPECIAL_IDS
        ids = (
            [sp["<s>"], sp["[SYSTEM_PROMPT]"]]
            + self.text_ids(system)
            + [sp["[/SYSTEM_PROMPT]"], sp["[INST]"]]
        )
        for rows, cols in image_token_grids or []:
            # Pixtral layout: each row of [IMG] tokens ends with [IMG_BREAK], the last one with [IMG_END].
            for r in range(rows):
                ids += [sp["[IMG]"]] * cols + [sp["[IMG_END]"] if r == rows - 1 else sp["[IMG_BREAK]"]]
        return ids + self.text_ids(user.replace("[IMG]", "")) + [sp["[/INST]"]]

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)


_TEKKEN_CACHE: dict[str, Tokenizer] = {}


def clear_tokenizer_cache() -> None:
    """Forget the tokenizers converted from tekken JSON (they are rebuilt on the next load)."""
    _TEKKEN_CACHE.clear()


def _digest(*parts: bytes) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(len(part).to_bytes(8, "little") + part)
    return h.hexdigest()


def _tekken_cached(data: bytes, source: str) -> Tokenizer:
    """Converting tekken takes about a second: reuse tokenizers built from identical bytes."""
    digest = _digest(data)
    if digest not in _TEKKEN_CACHE:
        if len(_TEKKEN_CACHE) >= 4:
            _TEKKEN_CACHE.pop(next(iter(_TEKKEN_CACHE)))
        _TEKKEN_CACHE[digest] = tekken_tokenizer(data, source)
    return _TEKKEN_CACHE[digest]


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise CheckpointError(
            path, f"cannot be read ({e.strerror or e}).", "Check that it exists and is readable."
        ) from None


_DAMAGED = "Download the tokenizer file again; it is damaged or incomplete."


def _json_tokenizer(path: Path) -> tuple[Tokenizer, str, str]:
    """(tokenizer, source, digest) from a Hugging Face ``tokenizer.json``; CheckpointError names the file."""
    data = _read(path)
    try:
        return Tokenizer.from_str(data.decode("utf-8")), str(path), _digest(data)
    except Exception as e:  # the tokenizers library raises plain Exceptions for broken JSON
        raise CheckpointError(path, f"is not a usable tokenizer.json ({e}).", _DAMAGED) from None


def _tekken_file(path: Path) -> tuple[Tokenizer, str, str]:
    data = _read(path)
    return _tekken_cached(data, str(path)), str(path), _digest(data)


def _vocab_tokenizer(vocab: Path, merges: Path) -> tuple[Tokenizer, str, str]:
    data = (_read(vocab), _read(merges))
    try:
        tok = qwen_tokenizer_from_vocab(vocab, merges)
    except CheckpointError:
        raise
    except Exception as e:
        raise CheckpointError(
            vocab, f"and {merges.name} are not a usable BPE vocabulary ({e}).", _DAMAGED
        ) from None
    return tok, str(vocab), _digest(*data)


def _candidate_dirs(model_path: Path) -> list[Path]:
    """Folders where a tokenizer for ``model_path`` may live, in search order."""
    base = model_path if model_path.is_dir() else model_path.parent
    dirs = [base / "tokenizer", base]
    if base.name == "text_encoder":  # diffusers pipeline: <root>/text_encoder + <root>/tokenizer
        dirs.insert(0, base.parent / "tokenizer")
    return dirs


def _from_dir(kind: str, d: Path) -> tuple[Tokenizer, str, str] | None:
    if kind == MISTRAL3:
        if (d / "tekken.json").is_file():
            return _tekken_file(d / "tekken.json")
        if (d / "tokenizer.json").is_file():
            return _json_tokenizer(d / "tokenizer.json")
        return None
    if (d / "tokenizer.json").is_file():
        return _json_tokenizer(d / "tokenizer.json")
    if (d / "vocab.json").is_file() and (d / "merges.txt").is_file():
        return _vocab_tokenizer(d / "vocab.json", d / "merges.txt")
    return None


_TOKENIZER_FILE_NAMES = ("tekken.json", "tokenizer.json", "vocab.json", "merges.txt", "tokenizer_config.json")


def tokenizer_files(
    model_path: str | os.PathLike,
    tokenizer: str | os.PathLike | None = None,
    fallback_dirs: Sequence[str | os.PathLike] = (),
) -> list[Path]:
    """Every file ``load_prompt_tokenizer`` may read for these arguments, present or not.

    For change detection: a tokenizer file that appears, disappears or changes in one of these
    places can change which tokenizer is loaded.
    """
    if tokenizer is not None:
        t = Path(tokenizer)
        return [t / n for n in _TOKENIZER_FILE_NAMES] if t.is_dir() else [t, t.parent / "merges.txt"]
    dirs = [*_candidate_dirs(Path(model_path)), *map(Path, fallback_dirs)]
    return [d / n for d in dirs for n in _TOKENIZER_FILE_NAMES]


def load_prompt_tokenizer(
    kind: str,
    model_path: str | os.PathLike,
    tokenizer: str | os.PathLike | None = None,
    tekken_bytes: bytes | None = None,
    fallback_dirs: Sequence[str | os.PathLike] = (),
) -> PromptTokenizer:
    """Find and load the tokenizer of a text encoder.

    Search order: the explicit ``tokenizer`` (file or folder); for Mistral the tekken bytes embedded
    in ComfyUI's file; then ``<pipeline>/tokenizer/``, ``tokenizer/`` and the model's own folder; then
    ``fallback_dirs`` (e.g. the Qwen BPE files a host application ships for weight files that carry none).

    Args:
        kind: ``"mistral3"`` or ``"qwen3"``.
        model_path: the text-encoder file or folder.
        tokenizer: optional explicit ``tekken.json`` / ``tokenizer.json`` file or tokenizer folder.
        tekken_bytes: tekken JSON bytes carried inside the checkpoint, if any.
        fallback_dirs: tokenizer folders searched last, only when nothing was found next to the model.

    Raises:
        CheckpointError: nothing usable found (the message lists where it looked).
    """
    model_path = Path(model_path)
    looked: list[str] = []
    if tokenizer is not None:
        t = Path(tokenizer)
        if t.is_file():
            if t.name.endswith(".json") and kind == MISTRAL3 and t.name != "tokenizer.json":
                return PromptTokenizer(kind, *_tekken_file(t))
            if t.name == "vocab.json" and (t.parent / "merges.txt").is_file():
                return PromptTokenizer(kind, *_vocab_tokenizer(t, t.parent / "merges.txt"))
            return PromptTokenizer(kind, *_json_tokenizer(t))
        if t.is_dir() and (found := _from_dir(kind, t)):
            return PromptTokenizer(kind, *found)
        raise CheckpointError(
            t,
            "is not a usable tokenizer file or folder.",
            "Point it at tekken.json (Mistral), tokenizer.json, or a folder with vocab.json "
            "+ merges.txt (Qwen3).",
        )
    if kind == MISTRAL3 and tekken_bytes is not None:
        return PromptTokenizer(
            kind,
            _tekken_cached(tekken_bytes, str(model_path)),
            f"{model_path} (embedded tekken_model)",
            _digest(tekken_bytes),
        )
    for d in [*_candidate_dirs(model_path), *map(Path, fallback_dirs)]:
        looked.append(str(d))
        if d.is_dir() and (found := _from_dir(kind, d)):
            return PromptTokenizer(kind, *found)
    wanted = (
        "tekken.json or tokenizer.json" if kind == MISTRAL3 else "tokenizer.json, or vocab.json + merges.txt"
    )
    where = "; ".join(looked)
    embedded = " The file carries no embedded 'tekken_model' either." if kind == MISTRAL3 else ""
    raise CheckpointError(
        model_path,
        f"has no {kind} tokenizer: looked for {wanted} in: {where}.{embedded}",
        "Put the model's tokenizer files next to it (or in a 'tokenizer' folder), or pass the "
        "tokenizer path explicitly.",
    )
