"""The text encoder's language model completed for writing: chat prompts in, logits or text out.

``Flux2TextEncoder`` holds only what embedding prompts needs (the first 30 / 27 decoder layers) and
never changes after loading. ``TextGenerator`` is a separate module built on demand from the same
checkpoint (``encoder.generator()``): it shares the encoder's embeddings, rotary embedding, final
norm and decoder layers (the same parameters, nothing copied) and loads the rest: the later
decoder layers, the output head and, for Mistral Small 3.x, the Pixtral vision tower and its
projector. Prompt upsampling is one use; any yes/no question about a prompt (and images) is another.

The decoder is run layer by layer with a transformers ``DynamicCache``, so each new token costs one
position; the cache keyword of the decoder layers is read from their signature (``cache`` in
transformers 5.24+, ``past_key_values`` before), never assumed.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from ..errors import CheckpointError, InputError
from ..inputs import check_text
from .spec import MISTRAL3, MISTRAL3_SPECIAL_IDS
from .vlm_images import prepare_vlm_image, split_batches, to_chw

if TYPE_CHECKING:
    from .encoder import Flux2TextEncoder

logger = logging.getLogger(__name__)

MAX_INPUT_TOKENS = 2048  # chat inputs are cut to this many tokens (keeping the final control token)


@dataclass
class GenerationParts:
    """What writing text needs on top of the encoder, loaded from its checkpoint.

    Attributes:
        later_layers: decoder layers after the encoder's last one, in order.
        lm_head: hidden -> vocabulary logits (the embeddings themselves when the model ties them).
        vision_tower: Pixtral vision encoder (Mistral files that carry one), else None.
        multi_modal_projector: vision features -> text hidden size, with the vision tower.
        vlm_config: the transformers ``Mistral3Config`` the vision parts were built from.
    """

    later_layers: list[nn.Module]
    lm_head: nn.Module
    vision_tower: nn.Module | None = None
    multi_modal_projector: nn.Module | None = None
    vlm_config: object | None = None


def _cache_keyword(layer: nn.Module) -> str:
    params = inspect.signature(type(layer).forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _new_cache(config):
    from transformers import DynamicCache

    try:
        return DynamicCache(config=config)
    except TypeError:  # releases whose DynamicCache takes no config
        return DynamicCache()


class TextGenerator(nn.Module):
    """A decoder-only language model over the encoder's weights (see the module docstring).

    Built by ``build_generator`` / ``Flux2TextEncoder.generator()``. Attributes: ``kind``,
    ``tokenizer`` (the encoder's ``PromptTokenizer``), ``layers`` (every decoder layer, the
    streamable blocks), ``lm_head``, ``vision_tower`` and ``multi_modal_projector`` (None without
    vision).
    """

    streamable_blocks = ("layers",)

    def __init__(self, encoder: Flux2TextEncoder, parts: GenerationParts):
        super().__init__()
        base = encoder.model
        self.kind = encoder.kind
        self.tokenizer = encoder.tokenizer
        self.config = base.config
        self.embed_tokens = base.embed_tokens
        self.rotary_emb = base.rotary_emb
        self.norm = base.norm
        self.layers = nn.ModuleList([*base.layers, *parts.later_layers])
        self.lm_head = parts.lm_head
        self.vision_tower = parts.vision_tower
        self.multi_modal_projector = parts.multi_modal_projector
        self.vlm_config = parts.vlm_config
        self._cache_kw = _cache_keyword(self.layers[0])

    @property
    def device(self) -> torch.device:
        return self.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_tokens.weight.dtype

    @property
    def sees_images(self) -> bool:
        """True when images given with a chat enter the model (Mistral with a vision tower)."""
        return self.kind == MISTRAL3 and self.vision_tower is not None

    # ------------------------------------------------------------------------------------ inputs
    def chat_inputs(
        self, system: str, user: str, images: Sequence | None = None
    ) -> tuple[list[int], torch.Tensor]:
        """Token ids and input embeddings of a system + user chat, up to where the answer starts.

        Args:
            system: the system prompt.
            user: the user's message.
            images: optional pictures (PIL images, HWC arrays, ComfyUI IMAGE batches or CHW tensors
                in [0, 1]); Mistral sees them side by side through its vision tower, Qwen3 ignores them
                (with a warning).

        Returns:
            ``ids`` (list of L ints) and ``embeds`` (1, L, hidden) with image features at the [IMG] tokens.
        """
        check_text("text generator", "system prompt", system)
        check_text("text generator", "prompt", user)
        pictures = [to_chw(im) for im in split_batches(images)]  # validates each image, even text-only
        tok = self.tokenizer
        if pictures and not self.sees_images:
            logger.warning(
                "%s reads text only; %d image(s) ignored.",
                "Qwen3" if self.kind != MISTRAL3 else "this file (no vision tower)",
                len(pictures),
            )
        if not pictures or not self.sees_images:
            ids = _limit(tok.chat_ids(system, user))
            return ids, self.embed_tokens(torch.tensor([ids], device=self.device))
        cfg = self.vlm_config
        unit = cfg.vision_config.patch_size * cfg.spatial_merge_size
        pixels = prepare_vlm_image(pictures, unit).to(self.device, self.dtype)  # (3, H, W)
        h, w = pixels.shape[1:]
        ids = _limit(tok.chat_ids(system, user, image_token_grids=[(h // unit, w // unit)]))
        image_sizes = torch.tensor([[h, w]], device=self.device)
        vision_out = self.vision_tower(pixels[None], image_sizes=image_sizes, output_hidden_states=True)
        layer = cfg.vision_feature_layer if isinstance(cfg.vision_feature_layer, int) else -1
        feats = vision_out.hidden_states[layer]  # (1, h/14 * w/14, vision hidden)
        feats = self.multi_modal_projector(feats.squeeze(0), image_sizes)  # (h/28 * w/28, hidden)
        id_tensor = torch.tensor([ids], device=self.device)
        embeds = self.embed_tokens(id_tensor)
        slots = id_tensor[0] == MISTRAL3_SPECIAL_IDS["[IMG]"]
        if int(slots.sum()) != feats.shape[0]:
            raise InputError(
                f"the prompt is too long to fit the image tokens ({int(slots.sum())} of {feats.shape[0]} "
                "left); shorten the prompt."
            )
        embeds[0, slots] = feats.to(embeds.dtype)
        return ids, embeds

    # ----------------------------------------------------------------------------------- running
    def _run(self, embeds: torch.Tensor, start: int, cache) -> torch.Tensor:
        """Hidden states (1, L, hidden) after the final norm for ``embeds`` at positions start.. ."""
        from .encoder import causal_mask

        n = embeds.shape[1]
        positions = torch.arange(start, start + n, device=embeds.device).unsqueeze(0)
        rope = self.rotary_emb(embeds, positions)
        mask = None
        if n > 1:  # one new token attends every cached one: no mask
            ones = torch.ones(1, n, dtype=torch.long, device=embeds.device)
            mask = causal_mask(ones, embeds.dtype, self.config._attn_implementation)
        h = embeds
        for layer in self.layers:
            h = layer(
                h,
                attention_mask=mask,
                position_ids=positions,
                position_embeddings=rope,
                use_cache=True,
                **{self._cache_kw: cache},
            )
        return self.norm(h)

    @torch.inference_mode()
    def next_token_logits(self, system: str, user: str, images: Sequence | None = None) -> torch.Tensor:
        """Logits of the first answer token for a chat (e.g. to compare the scores of "yes" and "no").

        Returns:
            (vocab,) float32 on the CPU.
        """
        _, embeds = self.chat_inputs(system, user, images)
        h = self._run(embeds, 0, _new_cache(self.config))
        return self.lm_head(h[:, -1]).float().cpu()[0]

    @torch.inference_mode()
    def generate_ids(
        self, embeds: torch.Tensor, seed: int = 0, max_new_tokens: int = 512, temperature: float = 0.15
    ) -> list[int]:
        """Sample up to ``max_new_tokens`` ids after ``embeds`` (1, L, hidden), stopping at end-of-turn.

        A seeded CPU generator makes the result depend only on the seed; temperature 0 is greedy.
        """
        if max_new_tokens < 1:
            raise InputError(f"max_new_tokens must be at least 1, got {max_new_tokens}.")
        if not temperature >= 0:
            raise InputError(f"temperature must be >= 0, got {temperature}.")
        gen = torch.Generator(device="cpu").manual_seed(int(seed))
        cache = _new_cache(self.config)
        h = self._run(embeds, 0, cache)
        pos = embeds.shape[1]
        new: list[int] = []
        for _ in range(max_new_tokens):
            logits = self.lm_head(h[:, -1]).float().cpu()[0]  # (vocab,)
            if temperature == 0:
                nxt = int(logits.argmax())
            else:
                nxt = int(torch.multinomial(torch.softmax(logits / temperature, dim=-1), 1, generator=gen))
            if nxt in self.tokenizer.eos_ids:
                break
            new.append(nxt)
            h = self._run(self.embed_tokens(torch.tensor([[nxt]], device=self.device)), pos, cache)
            pos += 1
        return new

    def generate(
        self,
        system: str,
        user: str,
        images: Sequence | None = None,
        seed: int = 0,
        max_new_tokens: int = 512,
        temperature: float = 0.15,
    ) -> str:
        """The model's answer to a system + user chat (and images), as text.

        Args:
            system, user, images: see ``chat_inputs``.
            seed: sampling seed; the same seed gives the same text.
            max_new_tokens: most tokens written.
            temperature: sampling temperature (0 = greedy).
        """
        _, embeds = self.chat_inputs(system, user, images)
        new = self.generate_ids(embeds, seed=seed, max_new_tokens=max_new_tokens, temperature=temperature)
        return self.tokenizer.decode(new).strip()

    def upsample(
        self,
        prompt: str,
        images: Sequence | None = None,
        seed: int = 0,
        max_new_tokens: int = 512,
        temperature: float = 0.15,
    ) -> str:
        """Rewrite ``prompt`` into a more detailed one (BFL-style prompt upsampling); see ``upsample.py``."""
        from .upsample import upsample_prompt

        return upsample_prompt(
            self, prompt, images=images, seed=seed, max_new_tokens=max_new_tokens, temperature=temperature
        )

    def extra_repr(self) -> str:
        return f"kind={self.kind}, layers={len(self.layers)}, vision={self.vision_tower is not None}"


def _limit(ids: list[int]) -> list[int]:
    if len(ids) <= MAX_INPUT_TOKENS:
        return ids
    logger.warning("chat input is %d tokens; keeping the first %d.", len(ids), MAX_INPUT_TOKENS)
    return ids[: MAX_INPUT_TOKENS - 1] + ids[-1:]


def build_generator(encoder: Flux2TextEncoder) -> TextGenerator:
    """Load what writing text needs from the encoder's checkpoint and build a ``TextGenerator``.

    The encoder is not changed. Its later layers, head and vision tower are read now (mapped or
    owned as when the encoder was loaded), placed on the encoder's device.

    Raises:
        CheckpointError: the file cannot write text (ComfyUI's pruned 30-layer [dev] encoder, a file
            without output head or final norm), or it changed since the encoder was loaded.
    """
    if encoder.generation_source is None:
        raise CheckpointError(
            None,
            f"this {encoder.kind} text encoder was built without access to its checkpoint, so it cannot write text.",
            "Load it with load_text_encoder.",
        )
    parts = encoder.generation_source()
    device = encoder.device
    for module in (*parts.later_layers, parts.lm_head, parts.vision_tower, parts.multi_modal_projector):
        if module is not None:
            module.eval().requires_grad_(False).to(device)
    return TextGenerator(encoder, parts).eval()
