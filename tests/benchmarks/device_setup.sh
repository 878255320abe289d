#!/usr/bin/env bash
# Sourced at the start of a benchmark command on the device machine (carry: .whl .device_comfy).
# Installs the carried wheels into /tmp/site and unpacks ComfyUI into /tmp/ComfyUI.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH="/tmp/site:${PYTHONPATH:-}"
if [ -f .device_comfy/comfyui.tar.gz ]; then
  mkdir -p /tmp/ComfyUI && tar xzf .device_comfy/comfyui.tar.gz -C /tmp/ComfyUI && export COMFYUI_PATH=/tmp/ComfyUI
fi
export PYTHONUNBUFFERED=1
