#!/usr/bin/env bash
# `vllm serve --enable-prompt-embeds` of one model folder on the CPU, from .venv-vllm (scripts/setup_vllm.sh), sized
# to start on any machine. vLLM's CPU worker otherwise sizes its KV cache as --gpu-memory-utilization x total RAM
# minus its own memory use (free memory does not count) and refuses to start when that cannot hold one sequence of
# the model's whole context (8,192 positions of SmolLM2: 0.35 GiB). Here the context and the KV space are fixed:
#   VLLM_MAX_MODEL_LEN   positions per sequence (default 2048)
#   VLLM_KV_CACHE_BYTES  KV cache size (default 1G = 1 GiB: about 23,000 positions of SmolLM2-135M in float32)
# It listens on 127.0.0.1 only. Set VLLM_API_KEY (vLLM reads it) and give the same key to `softprompt serve
# --vllm-url` (SOFTPROMPT_VLLM_API_KEY or --vllm-api-key): without one, whoever reaches vLLM's port bypasses the
# front's key. When vLLM cannot start it exits with its own reason. Usage (further arguments go to vLLM, and win
# over these):
#   VLLM_API_KEY=... bash scripts/vllm_serve.sh MODEL_FOLDER --port 8001 [--served-model-name base ...]
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
[ $# -ge 1 ] || { echo "usage: $0 MODEL_FOLDER [vllm serve options...]" >&2; exit 2; }
[ -x "$root/.venv-vllm/bin/python" ] || { echo "no vLLM environment at $root/.venv-vllm: run bash scripts/setup_vllm.sh" >&2; exit 2; }
model="$1"
shift
export VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
exec "$root/.venv-vllm/bin/python" -m vllm.entrypoints.openai.api_server --model "$model" --enable-prompt-embeds \
    --dtype float32 --enforce-eager --max-model-len "${VLLM_MAX_MODEL_LEN:-2048}" \
    --kv-cache-memory-bytes "${VLLM_KV_CACHE_BYTES:-1G}" --host 127.0.0.1 "$@"
