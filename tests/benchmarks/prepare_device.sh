#!/usr/bin/env bash
# Prepares what benchmark runs on the lent GPU machine need and it lacks (it has torch, transformers,
# safetensors, but no diffusers and no ComfyUI). The folders are git-ignored and travel with `carry`:
#   .whl/            diffusers 0.42.1 and the few wheels it adds (Python 3.12, x86_64)
#   .device_comfy/   the pinned ComfyUI tree's Python code as one tarball (frontend and tokenizers left out)
#   .device_kitchen/ comfy-kitchen's package without its ROCm library (the "ComfyUI as users run it" anchor)
# On the device: see tests/benchmarks/device_setup.sh (installs the wheels, unpacks ComfyUI).
set -euo pipefail
cd "$(dirname "$0")/../.."
COMFYUI_PATH="${COMFYUI_PATH:-$HOME/ComfyUI}"
mkdir -p .whl .device_comfy
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .whl diffusers==0.42.1 lazy-importer==0.1.0 importlib_metadata==10.2.0 comfy-aimdo==0.6.0 \
  torchsde==0.2.6 trampoline==0.1.2 2> >(grep -v "is ignored: it is neither" >&2)
# comfy-kitchen, which ComfyUI's requirements install for every user (its RoPE kernel, its FP8 ops):
# the wheel is 68 MB because of a ROCm library; unpacked without comfy_kitchen/backends/hip/_C.abi3.so
# it is about 41 MB and works from PYTHONPATH (device_setup.sh exports KITCHEN_PATH; the benchmark
# puts it on the path only for the runs "with comfy-kitchen").
KITCHEN_VERSION="${KITCHEN_VERSION:-0.2.40}"
rm -rf .device_kitchen && mkdir -p .device_kitchen
ck_tmp="$(mktemp -d)"
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  -d "$ck_tmp" "comfy-kitchen==$KITCHEN_VERSION" 2> >(grep -v "is ignored: it is neither" >&2)
python3 - "$ck_tmp" .device_kitchen <<'PY'
import glob, sys, zipfile
wheel = glob.glob(f"{sys.argv[1]}/comfy_kitchen-*.whl")[0]
with zipfile.ZipFile(wheel) as z:
    for name in z.namelist():
        # The package only (no dist-info), without the ROCm extension (158 MB unpacked).
        if name.startswith("comfy_kitchen/") and name != "comfy_kitchen/backends/hip/_C.abi3.so":
            z.extract(name, sys.argv[2])
PY
rm -rf "$ck_tmp"
(cd "$COMFYUI_PATH" && tar czf - --exclude='__pycache__' --exclude='comfy/text_encoders/*tokenizer*/*' --exclude='comfy/text_encoders/*tokenizer*.json' \
  --exclude='comfy/sd1_tokenizer' comfy comfy_api comfy_execution comfy_extras comfy_config folder_paths.py \
  comfyui_version.py node_helpers.py latent_preview.py nodes.py utils app server.py protocol.py main.py) \
  > .device_comfy/comfyui.tar.gz
du -sh .whl .device_comfy .device_kitchen
du -sc .whl .device_comfy .device_kitchen | tail -1  # all three travel with carry (64 MiB in all)
