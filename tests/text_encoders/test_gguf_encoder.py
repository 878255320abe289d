"""Text encoders from llama.cpp GGUF conversions: the same states as transformers on the same
(dequantized) weights, Q/K rows un-permuted, the tokenizer rebuilt from the file's own metadata."""

from __future__ import annotations

import pytest
import torch

from flux2_core import CheckpointError
from flux2_core.quant import GGUFLinear
from flux2_core.text_encoders import load_text_encoder
from flux2_core.tiny.gguf import llama_cpp_permute, reference_state_dict, write_tiny_gguf_text_encoder

PROMPTS = (
    "a red cube on a wooden table, golden hour",
    "Ünïcødé — 東京の夜景 🌃 and [INST] typed as text <|im_start|>",
)


@pytest.fixture(scope="module")
def gguf_te(tmp_path_factory, assets):
    root = tmp_path_factory.mktemp("gguf_te")
    made = {}

    def make(kind, mix, arch=None, with_tokenizer=True):
        key = (kind, mix, arch, with_tokenizer)
        if key not in made:
            made[key] = write_tiny_gguf_text_encoder(
                root / f"{kind}-{mix}-{arch}-{with_tokenizer}.gguf",
                kind,
                mix=mix,
                arch=arch,
                with_tokenizer=with_tokenizer,
            )
        return made[key]

    return make


def _rel(a, b, mask):
    m = mask.bool()
    return ((a - b)[m].norm() / b[m].norm()).item()


def _inverse_permutation(rows: int, heads: int) -> torch.Tensor:
    """Row order that undoes llama.cpp's permutation, found from the permutation itself."""
    perm = (
        llama_cpp_permute(torch.arange(rows, dtype=torch.float64).reshape(rows, 1), heads).reshape(-1).long()
    )
    return torch.argsort(perm)


def _transformers_from_gguf(path, kind, ref):
    """A transformers model whose weights are the GGUF's, dequantized by gguf's numpy decoders and
    put back in Hugging Face row order by the test's own inverse permutation."""
    import copy

    model = copy.deepcopy(ref)
    cfg = model.config.get_text_config()
    lm = model.model.language_model if kind == "mistral3" else model.model
    sd = reference_state_dict(path)
    names = {
        "attn_norm": "input_layernorm",
        "attn_q": "self_attn.q_proj",
        "attn_k": "self_attn.k_proj",
        "attn_v": "self_attn.v_proj",
        "attn_output": "self_attn.o_proj",
        "attn_q_norm": "self_attn.q_norm",
        "attn_k_norm": "self_attn.k_norm",
        "ffn_norm": "post_attention_layernorm",
        "ffn_gate": "mlp.gate_proj",
        "ffn_up": "mlp.up_proj",
        "ffn_down": "mlp.down_proj",
    }
    state = {}
    for name, w in sd.items():
        if name == "token_embd.weight":
            state["embed_tokens.weight"] = w
        elif name == "output_norm.weight":
            state["norm.weight"] = w
        elif name.startswith("blk."):
            _, i, part, _ = name.split(".")
            if kind == "mistral3" and part in ("attn_q", "attn_k"):
                heads = cfg.num_attention_heads if part == "attn_q" else cfg.num_key_value_heads
                w = w[_inverse_permutation(w.shape[0], heads)]
            state[f"layers.{i}.{names[part]}.weight"] = w
    missing, unexpected = lm.load_state_dict(state, strict=False)
    assert not unexpected and not [m for m in missing if "rotary" not in m]
    return model


@pytest.mark.parametrize(
    ("kind", "arch"), [("qwen3-4b", None), ("mistral3", "llama")], ids=["qwen3", "llama"]
)
def test_f32_gguf_equals_transformers_on_the_original_weights(gguf_te, reference, ref_stack, kind, arch):
    # F32 storage holds the tiny model's weights exactly: this checks the names, the un-permuted
    # Q/K rows (llama arch), the hyper-parameters read from the fields and the tokenizer.
    enc = load_text_encoder(gguf_te(kind, "F32", arch), dtype=torch.float32, cache=None)
    assert enc.checkpoint_format == "gguf" and enc.quant_summary == {"F32": 1.0}
    ids, mask = enc.tokenize(list(PROMPTS))
    ours = enc.hidden_states(ids, mask)
    theirs = ref_stack(reference(kind), ids, mask, enc.spec.hidden_layers)
    assert _rel(ours, theirs, mask) <= 1e-5


@pytest.mark.parametrize(
    ("kind", "arch", "mix"),
    [("mistral3", "mistral3", "mixed"), ("qwen3-8b", None, "Q8_0")],
    ids=["mistral3", "qwen3"],
)
def test_quantized_gguf_equals_transformers_on_the_dequantized_weights(
    gguf_te, reference, ref_stack, encoder, kind, arch, mix
):
    path = gguf_te(kind, mix, arch)
    enc = load_text_encoder(path, dtype=torch.float32, cache=None)
    layers = [m for m in enc.model.layers.modules() if isinstance(m, GGUFLinear)]
    assert len(layers) == 7 * len(enc.model.layers)  # q k v o gate up down stay in their stored bytes
    assert all(m.weight.dtype == torch.uint8 for m in layers)
    assert len({m.storage for m in layers}) >= (5 if mix == "mixed" else 1)
    ids, mask = enc.tokenize(list(PROMPTS))
    ours = enc.hidden_states(ids, mask)
    theirs = ref_stack(
        _transformers_from_gguf(path, kind.split("-")[0], reference(kind)), ids, mask, enc.spec.hidden_layers
    )
    assert theirs[mask.bool()].std() > 0.01
    assert _rel(ours, theirs, mask) <= 1e-5
    # streamed, with the paged layers read from the GGUF's own bytes, equals resident bit for bit
    from weight_streaming import StreamingConfig, WeightStreamer

    fixed = sum(p.numel() * p.element_size() for n, p in enc.named_parameters() if ".layers." not in n)
    block = sum(p.numel() * p.element_size() for p in enc.model.layers[0].parameters())
    cfg = StreamingConfig(vram_budget=fixed + 6 * block)
    with torch.no_grad(), WeightStreamer(enc, cfg, device="cpu", source=enc.weight_source) as ws:
        assert len(ws.plan.streamed_indices) > 10
        assert torch.equal(enc.hidden_states(ids, mask), ours)
    # the tokenizer rebuilt from tokenizer.ggml.* gives the Hugging Face / tekken tokenizer's ids
    hf = encoder(kind, "hf")
    for p in PROMPTS:
        assert enc.tokenizer.prompt_ids(p) == hf.tokenizer.prompt_ids(p)
        assert enc.tokenizer.text_ids(p) == hf.tokenizer.text_ids(p)


def test_gguf_without_tokenizer_metadata_is_refused(gguf_te, qwen_tokenizer_dir):
    path = gguf_te("qwen3-4b", "Q8_0", None, False)
    with pytest.raises(CheckpointError) as e:
        load_text_encoder(path, cache=None)
    msg = str(e.value)
    assert str(path) in msg and "tokenizer" in msg and "Fix:" in msg
    # an explicit tokenizer is still honoured
    enc = load_text_encoder(path, tokenizer=qwen_tokenizer_dir, dtype=torch.float32, cache=None)
    assert enc.kind == "qwen3"


def test_tokenizer_with_moved_control_ids_is_refused(tmp_path, gguf_te):
    import gguf
    import numpy as np

    src = gguf.GGUFReader(str(gguf_te("qwen3-4b", "Q8_0", None, False)))
    w = gguf.GGUFWriter(str(tmp_path / "moved.gguf"), "qwen3")
    for name, field in src.fields.items():
        if name.startswith("qwen3."):
            w.add_uint32(name, int(field.contents())) if isinstance(field.contents(), int) else w.add_float32(
                name, float(field.contents())
            )
    tokens = [f"t{i}" for i in range(151936)]
    tokens[:3] = ["t", "0", "t0"]
    tokens[151000] = "<|endoftext|>"  # not at 151643
    w.add_string("tokenizer.ggml.model", "gpt2")
    w.add_token_list(tokens)
    w.add_token_types([3 if t.startswith("<|") else 1 for t in tokens])
    w.add_token_merges(["t 0"])
    for t in src.tensors:
        w.add_tensor(t.name, np.asarray(t.data), raw_dtype=t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(CheckpointError, match="control tokens"):
        load_text_encoder(tmp_path / "moved.gguf", cache=None)


def test_transformer_gguf_given_to_the_text_encoder_loader(tmp_path):
    from flux2_core.tiny.gguf import write_tiny_gguf_transformer

    path = write_tiny_gguf_transformer(tmp_path, "klein-4b", mix="Q8_0")
    with pytest.raises(CheckpointError, match="diffusion transformer") as e:
        load_text_encoder(path, cache=None)
    assert str(path) in str(e.value) and "qwen_3_4b" in str(e.value)
