"""Layout detection and the key map at the real sizes, on meta tensors (no memory, no weights).

The fake checkpoints list the keys and shapes a real file has (taken from a real-size transformers
model built on the meta device, renamed to each published layout); nothing is ever materialised.
"""

from __future__ import annotations

import pytest
import torch

from flux2_core.text_encoders.layout import detect_layout
from flux2_core.text_encoders.loader import _name_map, _text_config
from flux2_core.text_encoders.spec import DECODER_PRESETS, TextEncoderSpec


class MetaReader:
    """The read-only part of ``CheckpointReader`` over name -> (shape, dtype), tensors on meta."""

    def __init__(self, entries: dict[str, tuple[tuple[int, ...], torch.dtype]]):
        self.entries = entries

    def keys(self):
        return list(self.entries)

    def shape(self, k):
        return self.entries[k][0]

    def dtype(self, k):
        return self.entries[k][1]

    def get(self, k):
        return torch.empty(self.entries[k][0], dtype=self.entries[k][1], device="meta")


def _real_decoder_entries(preset: str, kind: str, prefix: str = "") -> dict:
    from transformers import MistralConfig, MistralModel, Qwen3Config, Qwen3Model

    s = DECODER_PRESETS[preset]
    cfg_cls, model_cls = (MistralConfig, MistralModel) if kind == "mistral3" else (Qwen3Config, Qwen3Model)
    cfg = cfg_cls(
        vocab_size=s.vocab_size,
        hidden_size=s.hidden_size,
        intermediate_size=s.intermediate_size,
        num_hidden_layers=s.num_hidden_layers,
        num_attention_heads=s.num_attention_heads,
        num_key_value_heads=s.num_key_value_heads,
        head_dim=s.head_dim,
    )
    with torch.device("meta"):
        model = model_cls(cfg)
    return {f"{prefix}model.{k}": (tuple(v.shape), torch.bfloat16) for k, v in model.state_dict().items()}


@pytest.mark.parametrize(
    ("preset", "kind", "prefix", "context_dim"),
    [
        ("mistral-small-3.2-24b", "mistral3", "", 15360),
        ("mistral-small-3.2-24b", "mistral3", "text_encoders.mistral3_24b.transformer.", 15360),
        ("qwen3-4b", "qwen3", "", 7680),
        ("qwen3-8b", "qwen3", "text_encoders.qwen3_8b.transformer.", 12288),
    ],
)
def test_real_size_layouts_infer_the_published_config(preset, kind, prefix, context_dim, tmp_path):
    entries = _real_decoder_entries(preset, kind, prefix)
    if kind == "mistral3":
        entries["tekken_model"] = ((19_000_000,), torch.uint8)
    reader = MetaReader(entries)
    layout = detect_layout(reader, tmp_path / "te.safetensors")
    expected = DECODER_PRESETS[preset]
    assert layout.kind == kind
    for field in (
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "rope_theta",
        "rms_norm_eps",
        "tie_word_embeddings",
    ):
        assert getattr(layout.shape, field) == getattr(expected, field), field
    assert TextEncoderSpec.for_kind(kind).context_dim(layout.shape.hidden_size) == context_dim
    # Every parameter of the real-size model (meta) has a file tensor of the same shape.
    names = _name_map(reader, layout)
    from transformers import MistralModel, Qwen3Model

    with torch.device("meta"):
        model = (MistralModel if kind == "mistral3" else Qwen3Model)(
            _text_config(layout, layout.shape.num_hidden_layers)
        )
    for k, v in model.state_dict().items():
        assert reader.shape(names["model." + k]) == tuple(v.shape), k


def test_pruned_real_mistral_detected(tmp_path):
    entries = {
        k: v
        for k, v in _real_decoder_entries("mistral-small-3.2-24b", "mistral3").items()
        if not any(k.startswith(f"model.layers.{i}.") for i in range(30, 40))
    }
    layout = detect_layout(MetaReader(entries), tmp_path / "mistral_3_small_flux2_bf16.safetensors")
    assert layout.shape.num_hidden_layers == 30 and layout.kind == "mistral3"


def test_real_fp8_file_detected(tmp_path):
    entries = _real_decoder_entries("qwen3-4b", "qwen3")
    for k in [k for k in entries if k.endswith("_proj.weight")]:
        entries[k] = (entries[k][0], torch.float8_e4m3fn)
        entries[k[: -len("weight")] + "weight_scale"] = ((), torch.float32)
    assert detect_layout(MetaReader(entries), tmp_path / "qwen_3_4b_fp8.safetensors").quant == "fp8"
