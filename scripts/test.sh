#!/usr/bin/env bash
# Set up ./.venv and run every test: unit tests, SmolLM2 parity tests and every notebook under nbval,
# in the quick setting (MOR_LAB_QUICK=1).
# MOR_LAB_BROWSER=1 also runs tests/browser (every notebook in JupyterLab in Debian's headless Chromium:
# widgets and figures rendered, sliders redraw; the Voila explorer), installing chromium when missing.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
export MOR_LAB_QUICK=1 HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1} TOKENIZERS_PARALLELISM=false
if [ "${MOR_LAB_BROWSER:-0}" != "0" ]; then
    bash scripts/install_chromium.sh
    python -m pytest --nbval-lax -p no:cacheprovider tests notebooks "$@"
else
    python -m pytest --nbval-lax -p no:cacheprovider -m "not browser" tests notebooks "$@"
fi
