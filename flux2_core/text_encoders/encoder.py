"""The FLUX.2 text encoder: a transformers decoder run only up to the deepest layer FLUX.2 reads.

``encode`` embeds the tokens, runs decoder layers 1..N (N = 30 for Mistral, 27 for Qwen3) and
concatenates the outputs of the three chosen layers per token; later layers, the final norm and the
logits are never computed. The decoder layers are the streamable blocks (``model.layers``) that the
weight-streaming manager pages in and out. The encoder is fixed once loaded: writing text
(``generator()``, e.g. prompt upsampling) builds a separate ``TextGenerator`` that shares these
layers and loads the later ones, the output head and the vision tower from the same checkpoint.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch
from torch import nn

from ..errors import InputError
from ..inputs import check_text
from .cache import EMBEDDING_CACHE, EmbeddingCache
from .spec import TextEncoderSpec
from .tokenizer import PromptTokenizer

if TYPE_CHECKING:
    from .generator import GenerationParts, TextGenerator

logger = logging.getLogger(__name__)


def causal_mask(attention_mask: torch.Tensor, dtype: torch.dtype, implementation: str) -> torch.Tensor | None:
    """The decoder layers' attention mask for a padded batch, built here rather than by transformers.

    Query i sees key j when j <= i and key j is a token (not padding), as transformers' own
    causal mask; building it here keeps the encoder independent of the signature of
    ``transformers.masking_utils.create_causal_mask``, which changes between releases.

    Args:
        attention_mask: (B, L), 1 for tokens and 0 for padding.
        dtype: the activations' dtype (for an additive mask).
        implementation: the config's attention implementation ("sdpa", "eager", ...).

    Returns:
        None for SDPA when nothing is padded (SDPA's own causal path, as transformers does), a boolean
        (B, 1, L, L) mask (True = attend) for SDPA, else an additive (B, 1, L, L) mask in ``dtype``.
    """
    keep = attention_mask.bool()
    if implementation == "sdpa" and bool(keep.all()):
        return None
    n = keep.shape[1]
    causal = torch.ones(n, n, dtype=torch.bool, device=keep.device).tril()
    mask = causal[None, None] & keep[:, None, None, :]  # (B, 1, L, L)
    if implementation == "sdpa":
        return mask
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)


class Flux2TextEncoder(nn.Module):
    """Mistral Small 3.x or Qwen3 producing FLUX.2 prompt embeddings.

    Built by ``load_text_encoder``; see there. Attributes: ``kind``, ``spec``, ``context_dim``,
    ``tokenizer`` (a ``PromptTokenizer``), ``model`` (transformers ``MistralModel``/``Qwen3Model``
    whose ``layers`` hold only the layers FLUX.2 reads).
    """

    streamable_blocks = ("model.layers",)

    def __init__(
        self,
        spec: TextEncoderSpec,
        model: nn.Module,
        tokenizer: PromptTokenizer,
        identity: tuple = (),
        cache: EmbeddingCache | None = EMBEDDING_CACHE,
    ):
        super().__init__()
        self.spec = spec
        self.kind = spec.kind
        self.model = model
        self.tokenizer = tokenizer
        self.identity = identity
        self.cache = cache
        self.checkpoint_layout: str | None = None  # set by the loader, e.g. "decoder", "hf-mistral3"
        self.quant: str | None = None  # None, "fp8" or "fp8-legacy"
        # ``read_into(param_name, out)`` over the checkpoint, for WeightStreamer(source=...); set by the loader.
        self.weight_source = None
        # Set by the loader: reads what writing text needs (layers past spec.layers_needed, the output
        # head, the vision tower) from the checkpoint, anew on every call; see ``generator()``.
        self.generation_source: Callable[[], GenerationParts] | None = None
        cfg = model.config
        if any(t != "full_attention" for t in (getattr(cfg, "layer_types", None) or [])):
            raise ValueError("sliding-window attention layers are not supported for FLUX.2 text encoders")

    @property
    def context_dim(self) -> int:
        """Width of the prompt embeddings: 3 x hidden size (15360, 7680 or 12288 for the real models)."""
        return self.spec.context_dim(self.model.config.hidden_size)

    @property
    def device(self) -> torch.device:
        return self.model.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.embed_tokens.weight.dtype

    # ----------------------------------------------------------------------------------- tokens
    def tokenize(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Template, truncate and pad prompts.

        Returns:
            ``input_ids`` (B, max_length) long and ``attention_mask`` (B, max_length) long (1 = token).
        """
        spec = self.spec
        rows, masks = [], []
        for i, prompt in enumerate(prompts):
            check_text("text encoder", f"prompt {i}", prompt)
            ids = self.tokenizer.prompt_ids(prompt, max_length=spec.max_length)
            if len(ids) > spec.max_length:
                logger.warning(
                    "prompt %d is longer than %d tokens with its template (%d characters); only the first "
                    "%d are used (FLUX.2 reads %d tokens). Shorten the prompt to keep its end.",
                    i,
                    spec.max_length,
                    len(prompt),
                    spec.max_length,
                    spec.max_length,
                )
                ids = ids[: spec.max_length]
            pad = [spec.pad_id] * (spec.max_length - len(ids))
            mask = [1] * len(ids)
            if spec.pad_left:
                rows.append(pad + ids)
                masks.append([0] * len(pad) + mask)
            else:
                rows.append(ids + pad)
                masks.append(mask + [0] * len(pad))
        return torch.tensor(rows, dtype=torch.long), torch.tensor(masks, dtype=torch.long)

    # ---------------------------------------------------------------------------------- forward
    def hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Concatenated outputs of the spec's decoder layers.

        Args:
            input_ids: (B, L) token ids.
            attention_mask: (B, L), 1 for tokens and 0 for padding.

        Returns:
            (B, L, 3 x hidden) in the model dtype, layer-major along the last axis.
        """
        model = self.model
        wanted = set(self.spec.hidden_layers)
        n_run = self.spec.layers_needed
        if len(model.layers) < n_run:
            raise InputError(
                f"the encoder has {len(model.layers)} decoder layers loaded; FLUX.2 needs {n_run}."
            )
        device = self.device
        input_ids = input_ids.to(device)
        attention_mask = attention_mask.to(device)
        embeds = model.embed_tokens(input_ids)  # (B, L, H)
        # Positions 0..L-1 for every row, padding included: what the reference forward does.
        position_ids = torch.arange(input_ids.shape[1], device=device).unsqueeze(0)
        mask = causal_mask(attention_mask, embeds.dtype, model.config._attn_implementation)
        rope = model.rotary_emb(embeds, position_ids)
        h = embeds
        picked: dict[int, torch.Tensor] = {}
        for i in range(n_run):
            h = model.layers[i](h, attention_mask=mask, position_ids=position_ids, position_embeddings=rope)
            if i + 1 in wanted:
                picked[i + 1] = h
        return torch.cat([picked[n] for n in self.spec.hidden_layers], dim=-1)

    def _cache_key(self, prompt: str) -> tuple:
        s = self.spec
        return (
            self.identity,
            self.tokenizer.identity,
            s.kind,
            s.hidden_layers,
            s.max_length,
            s.pad_id,
            s.pad_left,
            str(self.dtype),
            prompt,
        )

    @torch.inference_mode()
    def encode(self, prompts: str | Sequence[str], use_cache: bool = True) -> torch.Tensor:
        """FLUX.2 prompt embeddings.

        Args:
            prompts: one prompt or a list of prompts ("" is a valid, empty prompt).
            use_cache: reuse embeddings of prompts seen before with this file and these settings.

        Returns:
            (B, 512, context_dim) tensor on the encoder's device, in its dtype.
        """
        if isinstance(prompts, str):
            prompts = [prompts]
        prompts = list(prompts)
        if not prompts:
            raise InputError("no prompt given: pass at least one (possibly empty) prompt.")
        use_cache = use_cache and self.cache is not None and bool(self.identity)
        results: list[torch.Tensor | None] = [None] * len(prompts)
        todo = []
        for i, p in enumerate(prompts):
            hit = self.cache.get(self._cache_key(p)) if use_cache else None
            if hit is not None:
                results[i] = hit.to(self.device)
            else:
                todo.append(i)
        if todo:
            ids, mask = self.tokenize([prompts[i] for i in todo])
            out = self.hidden_states(ids, mask)
            for j, i in enumerate(todo):
                results[i] = out[j]
                if use_cache:
                    self.cache.put(self._cache_key(prompts[i]), out[j])
        return torch.stack(results)  # (B, 512, context_dim)

    # ------------------------------------------------------------------------------- generation
    def generator(self) -> TextGenerator:
        """A ``TextGenerator`` over this encoder's weights (prompt upsampling, questions about a prompt).

        Built anew on each call (keep it while needed): the later decoder layers, the output head and
        the vision tower are read from the checkpoint; this encoder is not changed.

        Raises:
            CheckpointError: the file cannot write text (see ``build_generator``).
        """
        from .generator import build_generator

        return build_generator(self)

    def extra_repr(self) -> str:
        return (
            f"kind={self.kind}, layers={len(self.model.layers)}/{self.model.config.num_hidden_layers}, "
            f"context_dim={self.context_dim}"
        )
