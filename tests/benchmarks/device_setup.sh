#!/usr/bin/env bash
# Sourced at the start of a benchmark command on the device machine (carry: .whl .device_comfy
# .device_kitchen). Installs the carried wheels into /tmp/site, unpacks ComfyUI into /tmp/ComfyUI and
# points KITCHEN_PATH at the carried comfy-kitchen (kept off PYTHONPATH: the benchmark adds it only for
# the runs "with comfy-kitchen").
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH="/tmp/site:${PYTHONPATH:-}"
if [ -f .device_comfy/comfyui.tar.gz ]; then
  mkdir -p /tmp/ComfyUI && tar xzf .device_comfy/comfyui.tar.gz -C /tmp/ComfyUI && export COMFYUI_PATH=/tmp/ComfyUI
fi
if [ -d .device_kitchen/comfy_kitchen ]; then
  export KITCHEN_PATH="$PWD/.device_kitchen"
fi
export PYTHONUNBUFFERED=1
