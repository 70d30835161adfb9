#!/usr/bin/env bash
# Set up ./.venv, convert the offline model once, and open the notebooks in JupyterLab.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
python -c "import mor_lab; mor_lab.load_pretrained()" >/dev/null
exec mor-lab lab "$@"
