#!/usr/bin/env bash
# The main job (README): runs a shared FLUX.2 workflow headless through a real ComfyUI and prints
# where the PNG is. Real weights in $COMFYUI_PATH/models are used when present; otherwise a tiny
# random set is written once and the output is noise from an untrained model (every node still runs).
#   bash workflows/run.sh [--workflow NAME] [--out DIR] [--tiny]
set -euo pipefail
source "$(dirname "$0")/../.ci/env.sh"
cd "$FLUX2LOCAL_ROOT"
python workflows/run_workflow.py "$@"
