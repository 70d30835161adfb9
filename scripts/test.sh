#!/usr/bin/env bash
# Set up ./.venv and run every test: unit tests, SmolLM2 parity tests, every notebook in JupyterLab in
# headless Chromium (tests/browser: widgets and figures rendered, sliders redraw, the Voila explorer),
# and every notebook under nbval, all in the quick setting (MOR_LAB_QUICK=1).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/install_chromium.sh
. .venv/bin/activate
export MOR_LAB_QUICK=1 HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1} TOKENIZERS_PARALLELISM=false
python -m pytest --nbval-lax -p no:cacheprovider tests notebooks "$@"
