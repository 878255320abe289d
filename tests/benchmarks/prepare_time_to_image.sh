#!/usr/bin/env bash
# Prepares, here, what time_to_image.py needs on the lent GPU machine, which has torch, transformers,
# safetensors, numpy and the usual scientific packages but no ComfyUI and no network:
#   .device_out/tti_carry/partN/   each under the 64 MiB carry limit; carry one part per device command
#     *.whl             the ComfyUI server's requirements the machine lacks (TTI_WHEELS below; add names
#                       with TTI_EXTRA="pkg==v ..." if the first run says an import is missing)
#     comfyui.tar.gz    the pinned ComfyUI tree's code WITH its tokenizer folders (CLIPLoader and our
#                       Qwen3 fallback need qwen25_tokenizer); no frontend: the server gets an empty root
#     tekken.json       Mistral's tokenizer, embedded in the random Mistral file as ComfyUI's files do
#     comfyui-gguf.tar.gz  city96's ComfyUI-GGUF (ComfyUI's side of the dev-gguf set; gguf is a wheel)
# On the device, after each command that carried a part: `source tests/benchmarks/tti_device_setup.sh`
# (installs into the ignored .device_out/, which stays while the machine is warm).
set -euo pipefail
cd "$(dirname "$0")/../.."
COMFYUI_PATH="${COMFYUI_PATH:-$HOME/ComfyUI}"
COMFYUI_GGUF_PATH="${COMFYUI_GGUF_PATH:-$HOME/ComfyUI-GGUF}"
# Versions as in the test venv; comfy-kitchen (68 MB) is left out: ComfyUI imports it optionally.
TTI_WHEELS="aiohttp==3.14.5 aiohappyeyeballs==2.7.1 aiosignal==1.4.0 frozenlist==1.8.0 multidict==7.2.1
  propcache==0.5.4 yarl==1.25.1 attrs==26.1.0 alembic==1.20.1 SQLAlchemy==2.1.9 Mako==1.4.3 MarkupSafe==3.0.4
  greenlet av==18.1.0 torchsde==0.2.6 trampoline==0.1.2 einops==0.8.2 comfy-aimdo==0.6.0 spandrel==0.4.2
  kornia==0.9.0 kornia_rs==0.2.0 sentencepiece==0.2.3 pydantic-settings==2.16.3 python-dotenv==1.2.4
  pydantic==2.12.5 pydantic_core==2.41.5 annotated-types==0.7.0 typing-inspection==0.4.2
  gguf==0.19.0 ${TTI_EXTRA:-}"
rm -rf .device_out/tti_carry && mkdir -p .device_out/tti_carry/all
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .device_out/tti_carry/all $TTI_WHEELS 2> >(grep -v "is ignored: it is neither" >&2)
(cd "$COMFYUI_PATH" && tar czf - --exclude='__pycache__' comfy comfy_api comfy_execution comfy_extras \
  comfy_config app api_server middleware alembic_db alembic.ini folder_paths.py comfyui_version.py \
  node_helpers.py latent_preview.py nodes.py utils server.py protocol.py main.py execution.py \
  cuda_malloc.py hook_breaker_ac10a0.py new_updater.py) > .device_out/tti_carry/all/comfyui.tar.gz
cp "${FLUX2LOCAL_ASSETS:?run .ci/env.sh first (FLUX2LOCAL_ASSETS)}/mistral3-tekken/tekken.json" .device_out/tti_carry/all/
(cd "$COMFYUI_GGUF_PATH" && tar czf - --exclude='__pycache__' --exclude='.git' .) > .device_out/tti_carry/all/comfyui-gguf.tar.gz
# Pack the files into parts of at most 60 MiB (largest first).
python3 - <<'PY'
import os, shutil
from pathlib import Path
root = Path(".device_out/tti_carry"); files = sorted((root / "all").iterdir(), key=lambda p: -p.stat().st_size)
parts: list[list] = []
for f in files:
    n = f.stat().st_size
    if n > 60 << 20:
        raise SystemExit(f"{f.name} is {n >> 20} MiB: over one carry")
    for part in parts:
        if part[0] + n <= 60 << 20:
            part[0] += n; part[1].append(f); break
    else:
        parts.append([n, [f]])
for i, (n, fs) in enumerate(parts, 1):
    d = root / f"part{i}"; d.mkdir()
    for f in fs:
        shutil.move(str(f), d / f.name)
    print(f"{d}: {n / 2**20:.1f} MiB, {len(fs)} files")
(root / "all").rmdir()
PY
