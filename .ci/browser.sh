#!/usr/bin/env bash
# Installs headless Chromium (Debian's `chromium` package) for tests/comfyui/test_editor_opens_workflows.py,
# which opens every UI-format workflow in the real ComfyUI frontend as a person would.
# Run by .ci/env.sh once per content hash of this file, and by the test itself when the browser is
# missing; safe to run again (does nothing when $CHROMIUM is there). Only the Debian registry is
# reached; any failure stops with a message and a non-zero status (the test then FAILS, never skips).
set -euo pipefail

CHROMIUM="${FLUX2LOCAL_CHROMIUM:-/usr/bin/chromium}"
fail() { echo "error: browser.sh: $*" >&2; exit 1; }

if [ -x "$CHROMIUM" ]; then
  exit 0
fi
command -v apt-get >/dev/null 2>&1 \
  || fail "no $CHROMIUM and no apt-get: install Chromium yourself and set FLUX2LOCAL_CHROMIUM to its path."
SUDO=""
if [ "$(id -u)" != 0 ]; then
  command -v sudo >/dev/null 2>&1 || fail "installing chromium needs root (or sudo); run: apt-get install -y chromium"
  SUDO="sudo -n"
fi
echo "[browser] installing Debian's chromium package (first run only)" >&2
log=$(mktemp)
trap 'rm -f "$log"' EXIT
if ! { $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium; } >"$log" 2>&1; then
  tail -n 20 "$log" >&2
  fail "apt-get install chromium failed (see above)."
fi
[ -x "$CHROMIUM" ] || fail "apt-get installed chromium, but there is no executable at $CHROMIUM."
