#!/usr/bin/env bash
# Prepares what the quantized benchmark needs on the lent GPU machine on top of prepare_device.sh:
#   .device_quant/site/            gguf 0.19.0 (pure Python) and comfy-kitchen 0.2.40 unzipped without its
#                                  ROCm library (41 MB instead of 68 MB), importable from PYTHONPATH
#   .device_quant/ComfyUI-GGUF/    city96's ComfyUI-GGUF (the GGUF anchor), from $COMFYUI_GGUF_PATH
#   .device_quant_av/              av 18.1.0 (35 MB), which ComfyUI's nodes import when ComfyUI-GGUF loads:
#                                  too big to travel beside comfy-kitchen, so carry it in an earlier
#                                  command of the same warm machine (quantized_setup.sh installs it into
#                                  the ignored .device_quant/site, which stays while the machine is warm)
# The folders are git-ignored and travel with `carry` next to .whl and .device_comfy.
set -euo pipefail
cd "$(dirname "$0")/../.."
GGUF_TREE="${COMFYUI_GGUF_PATH:-$HOME/ComfyUI-GGUF}"
rm -rf .device_quant && mkdir -p .device_quant/site .device_quant/wheels
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .device_quant/wheels gguf==0.19.0 comfy-kitchen==0.2.40 2> >(grep -v "is ignored: it is neither" >&2)
for w in .device_quant/wheels/*.whl; do
  python3 -m zipfile -e "$w" .device_quant/site
done
rm -rf .device_quant/wheels .device_quant/site/comfy_kitchen/backends/hip/_C*.so
mkdir -p .device_quant/ComfyUI-GGUF
cp "$GGUF_TREE"/*.py "$GGUF_TREE"/LICENSE .device_quant/ComfyUI-GGUF/
mkdir -p .device_quant/ComfyUI-GGUF/tools && cp "$GGUF_TREE"/tools/*.py .device_quant/ComfyUI-GGUF/tools/
rm -rf .device_quant_av && mkdir -p .device_quant_av
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 -d .device_quant_av av==18.1.0 2> >(grep -v "is ignored: it is neither" >&2)
du -sh .device_quant .device_quant_av
