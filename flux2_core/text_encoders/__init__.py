"""FLUX.2 text encoders: Mistral Small 3.x ([dev]) and Qwen3 4B/8B ([klein]), tokenizers, upsampling."""

from .cache import EMBEDDING_CACHE, EmbeddingCache, clear_caches
from .encoder import Flux2TextEncoder
from .loader import load_text_encoder
from .spec import MISTRAL3, MISTRAL3_SYSTEM_PROMPT, QWEN3, TextEncoderSpec
from .tokenizer import PromptTokenizer, load_prompt_tokenizer

__all__ = [
    "EMBEDDING_CACHE",
    "MISTRAL3",
    "MISTRAL3_SYSTEM_PROMPT",
    "QWEN3",
    "EmbeddingCache",
    "Flux2TextEncoder",
    "PromptTokenizer",
    "TextEncoderSpec",
    "clear_caches",
    "load_prompt_tokenizer",
    "load_text_encoder",
]
