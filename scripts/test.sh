#!/usr/bin/env bash
# Set up ./.venv and run every test: unit tests, SmolLM2 parity tests, every notebook under nbval, and
# every notebook again in a real browser (tests/browser: JupyterLab in Debian's headless Chromium, widgets
# and figures rendered, a slider moved per notebook; the Voila explorer), all in the quick setting
# (MOR_LAB_QUICK=1). Chromium is installed from Debian's packages when missing and we are root; without
# it the browser tests skip (MOR_LAB_REQUIRE_BROWSER=1 makes that a failure). MOR_LAB_BROWSER=0 skips them.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
export MOR_LAB_QUICK=1 HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1} TOKENIZERS_PARALLELISM=false
if [ "${MOR_LAB_BROWSER:-1}" != "0" ]; then
    bash scripts/install_chromium.sh
    python -m pytest --nbval-lax -p no:cacheprovider tests notebooks "$@"
else
    python -m pytest --nbval-lax -p no:cacheprovider -m "not browser" tests notebooks "$@"
fi
