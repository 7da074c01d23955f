#!/usr/bin/env bash
# The tests that need a CUDA GPU (gpu_tests/), outside the default collection because CI has none: they fail, never
# skip, where no GPU is. After scripts/setup.sh; on the GPU machine, install a CUDA build of torch into .venv first
# (setup.sh pins the CPU build). The same skip rule as the main suite (tests/skip_policy.py).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHONPATH=tests .venv/bin/python -m pytest -q -p skip_policy gpu_tests "$@"
