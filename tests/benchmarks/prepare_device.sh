#!/usr/bin/env bash
# Prepares what benchmark runs on the lent GPU machine need and it lacks (it has torch, transformers,
# safetensors, but no diffusers and no ComfyUI). Both folders are git-ignored and travel with `carry`:
#   .whl/            diffusers 0.42.1 and the few wheels it adds (Python 3.12, x86_64)
#   .device_comfy/   the pinned ComfyUI tree's Python code as one tarball (frontend and tokenizers left out)
# On the device: see tests/benchmarks/device_setup.sh (installs the wheels, unpacks ComfyUI).
set -euo pipefail
cd "$(dirname "$0")/../.."
COMFYUI_PATH="${COMFYUI_PATH:-$HOME/ComfyUI}"
mkdir -p .whl .device_comfy
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .whl diffusers==0.42.1 lazy-importer==0.1.0 importlib_metadata==10.2.0 comfy-aimdo==0.6.0 \
  torchsde==0.2.6 trampoline==0.1.2 2> >(grep -v "is ignored: it is neither" >&2)
# comfy-kitchen is left out on purpose: 67 MB would pass the 64 MiB carry limit, and ComfyUI imports it
# optionally (only its fp8/fp4 paths need it).
(cd "$COMFYUI_PATH" && tar czf - --exclude='__pycache__' --exclude='comfy/text_encoders/*tokenizer*/*' --exclude='comfy/text_encoders/*tokenizer*.json' \
  --exclude='comfy/sd1_tokenizer' comfy comfy_api comfy_execution comfy_extras comfy_config folder_paths.py \
  comfyui_version.py node_helpers.py latent_preview.py nodes.py utils app server.py protocol.py main.py) \
  > .device_comfy/comfyui.tar.gz
du -sh .whl .device_comfy
