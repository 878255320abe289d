#!/usr/bin/env bash
# Sourced on the device before time_to_image.py, after each command that carried a .device_out/tti_carry/partN
# (see prepare_time_to_image.sh). Installs what was carried into .device_out/ (ignored, so it stays
# between commands while the machine is warm) and points Python and the benchmark at it.
TTI_DEV="$PWD/.device_out"
mkdir -p "$TTI_DEV/tti_site" "$TTI_DEV/ComfyUI" "$TTI_DEV/ComfyUI-GGUF"
for part in .device_out/tti_carry/part*/; do
  [ -d "$part" ] || continue
  if ls "$part"/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target "$TTI_DEV/tti_site" "$part"/*.whl
  fi
  [ -f "$part/comfyui.tar.gz" ] && tar xzf "$part/comfyui.tar.gz" -C "$TTI_DEV/ComfyUI"
  [ -f "$part/comfyui-gguf.tar.gz" ] && tar xzf "$part/comfyui-gguf.tar.gz" -C "$TTI_DEV/ComfyUI-GGUF"
  [ -f "$part/tekken.json" ] && cp "$part/tekken.json" "$TTI_DEV/tekken.json"
done
export PYTHONPATH="$TTI_DEV/tti_site:${PYTHONPATH:-}"
export COMFYUI_PATH="$TTI_DEV/ComfyUI"
export COMFYUI_GGUF_PATH="$TTI_DEV/ComfyUI-GGUF"
export PYTHONUNBUFFERED=1
