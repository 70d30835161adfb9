#!/usr/bin/env bash
# Set up ./.venv and run every test: unit tests, SmolLM2 parity tests, and every notebook under nbval
# in the quick setting (MOR_LAB_QUICK=1).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
export MOR_LAB_QUICK=1 HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1} TOKENIZERS_PARALLELISM=false
python -m pytest --nbval-lax -p no:cacheprovider tests notebooks "$@"
