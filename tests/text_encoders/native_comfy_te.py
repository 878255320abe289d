"""Runs ComfyUI's own FLUX.2 text encoder on a tiny file; used by test_comfyui_native.py in a subprocess.

Usage (cwd = the ComfyUI tree): python native_comfy_te.py FILE KIND OUT.safetensors INPUTS_JSON
INPUTS_JSON is a list of prompts (ComfyUI's tokenizer is used) or of id lists (fed as tokens as is).

ComfyUI hardcodes the real sizes in its config dataclasses (comfy/text_encoders/llama.py) and picks the
encoder by hidden size (comfy/sd.py detect_te_model), so this script swaps in a config class with the
tiny file's sizes; everything else (model code, tokenizer, layer selection, stacking) is ComfyUI's.
"""

import dataclasses
import json
import sys

ARGS = sys.argv[1:]
sys.argv = [sys.argv[0], "--cpu"]  # ComfyUI parses the command line on import

import comfy.options  # noqa: E402

comfy.options.enable_args_parsing()
import comfy.cli_args  # noqa: E402,F401
import comfy.text_encoders.flux as flux  # noqa: E402
import comfy.text_encoders.llama as llama  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

path, kind, out_path, inputs = ARGS[0], ARGS[1], ARGS[2], json.loads(ARGS[3])
sd = load_file(path)
vocab, hidden = sd["model.embed_tokens.weight"].shape
n_layers = 1 + max(int(k.split(".")[2]) for k in sd if k.startswith("model.layers."))
head_dim = 32
name = {"qwen3-4b": "Qwen3_4BConfig", "qwen3-8b": "Qwen3_8BConfig", "mistral3": "Mistral3Small24BConfig"}[
    kind
]
tiny = dataclasses.make_dataclass(
    "Tiny" + name,
    [
        ("hidden_size", int, hidden),
        ("vocab_size", int, vocab),
        ("num_hidden_layers", int, n_layers),
        ("intermediate_size", int, sd["model.layers.0.mlp.gate_proj.weight"].shape[0]),
        ("num_attention_heads", int, sd["model.layers.0.self_attn.q_proj.weight"].shape[0] // head_dim),
        ("num_key_value_heads", int, sd["model.layers.0.self_attn.k_proj.weight"].shape[0] // head_dim),
    ],
    bases=(getattr(llama, name),),
)
tiny.head_dim = head_dim  # a plain class attribute in ComfyUI's configs, not a field
setattr(llama, name, tiny)

if kind == "mistral3":
    te = flux.flux2_te(pruned=n_layers < 40)(device="cpu", dtype=torch.float32)
    key, tok = "mistral3_24b", None  # ComfyUI's tekken loader fails with transformers 5: ids are given
else:
    te = flux.klein_te(model_type=kind.replace("-", "_"))(device="cpu", dtype=torch.float32)
    key = kind.replace("-", "_")
    tok = (flux.KleinTokenizer if kind == "qwen3-4b" else flux.KleinTokenizer8B)()
missing, unexpected = te.load_sd({k: v.float() for k, v in sd.items() if k.startswith("model.")})
outs = {}
for i, item in enumerate(inputs):
    tokens = {key: [[(t, 1.0) for t in item]]} if isinstance(item, list) else tok.tokenize_with_weights(item)
    out, _, _ = te.encode_token_weights(tokens)
    outs[f"out{i}"] = out[0].contiguous()
    if tok is not None:
        outs[f"ids{i}"] = torch.tensor([t[0] for t in tokens[key][0]])
save_file(outs, out_path)
print(json.dumps({"missing": sorted(missing), "unexpected": sorted(unexpected)}))
