#!/usr/bin/env bash
# The test command (README): sets up the environment on first use, then runs the whole suite.
set -euo pipefail
source "$(dirname "$0")/../.ci/env.sh"
cd "$FLUX2LOCAL_ROOT"
python -m pytest "$@"
