#!/usr/bin/env bash
# On a machine with a CUDA GPU: the device tests and the dtype tests on it, then the training and serving benchmarks
# there (float32 and bfloat16), printed as one report (also written to gpu_check.md). It needs a CUDA build of torch
# and the project installed (scripts/setup.sh pins the CPU build: on the GPU machine install a CUDA one over it, or
# point PYTHON at an environment that has one). Fails where no GPU is, never skips.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-.venv/bin/python}
report=${1:-gpu_check.md}
"$python" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA GPU visible to torch')"
{
  echo "# softprompt on $(nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | head -1), $(date -u '+%F %H:%M UTC')"
  echo
  echo '## Tests on the GPU (gpu_tests/, tests/test_half_precision.py, tests/test_devices.py)'
  SOFTPROMPT_TEST_DEVICE=cuda PYTHONPATH=tests "$python" -m pytest -q -p skip_policy gpu_tests \
    tests/test_half_precision.py tests/test_devices.py 2>&1 | tail -5 || echo "TESTS FAILED (the benchmarks still run)"
  echo
  echo '## Training: ours and PEFT, float32 and bfloat16'
  "$python" benchmarks/train_speed.py --device cuda --dtype float32,bfloat16 --steps 10 --repeats 3 2>/dev/null
  echo
  echo '## Serving: our engine and PEFT in bfloat16'
  "$python" benchmarks/serve_speed.py --device cuda --dtype bfloat16 --no-vllm 2>/dev/null
} | tee "$report"
