#!/usr/bin/env bash
# Sourced on the device machine after device_setup.sh (carry: .whl .device_comfy .device_quant):
# gguf and comfy-kitchen from .device_quant/site, ComfyUI-GGUF from .device_quant/ComfyUI-GGUF.
# av (ComfyUI's nodes import it) comes in its own carry, once per warm machine (prepare_quantized.sh).
if ls .device_quant_av/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target .device_quant/site .device_quant_av/*.whl
fi
if [ -d .device_quant/site ]; then
  export PYTHONPATH="$PWD/.device_quant/site:${PYTHONPATH:-}"
fi
if [ -d .device_quant/ComfyUI-GGUF ]; then
  export COMFYUI_GGUF_PATH="$PWD/.device_quant/ComfyUI-GGUF"
fi
# ComfyUI imports its text encoders' tokenizer modules; the carried tree leaves their data out.
if [ -n "${COMFYUI_PATH:-}" ] && [ -d .whl/comfyui-bench/comfy/text_encoders ]; then
  cp -rn .whl/comfyui-bench/comfy/text_encoders/. "$COMFYUI_PATH/comfy/text_encoders/" 2>/dev/null || true
fi
