#!/usr/bin/env bash
# Rebuild the Binder environment from binder/ alone, in a fresh venv, the way repo2docker does
# (pip install -r binder/requirements.txt from the repository root, then binder/postBuild), and run
# one notebook in it through binder/start (the quick setting) with the kernel's peak memory measured
# against Binder's 2 GB. Then `mor-lab lab --check` must report a healthy environment.
#
# Usage: bash scripts/check_binder.sh [notebook]      (default notebooks/00_tour.ipynb)
# Env:   BINDER_VENV (default: a temporary folder, removed afterwards), PYTHON (default python3),
#        BINDER_MEMORY_MB (default 2048). The pip cache is reused, so a second run downloads nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
NOTEBOOK=${1:-notebooks/00_tour.ipynb}
PYTHON=${PYTHON:-python3}
LIMIT_MB=${BINDER_MEMORY_MB:-2048}
SCRATCH=$(mktemp -d)
trap 'rm -rf "$SCRATCH"' EXIT
VENV=${BINDER_VENV:-$SCRATCH/venv}
start=$(date +%s)

rm -rf "$VENV"
"$PYTHON" -m venv "$VENV"
. "$VENV/bin/activate"
export MOR_LAB_CACHE="$SCRATCH/cache"  # convert the offline model anew, as Binder's build does
# Where the CPU wheel index of binder/requirements.txt is unreachable (a registry-only network), fail
# over to the other indexes at once instead of retrying every package five times.
export PIP_RETRIES=${PIP_RETRIES:-0}
echo "== pip install -r binder/requirements.txt (fresh venv $VENV)"
python -m pip install -q -r binder/requirements.txt
echo "== binder/postBuild"
bash binder/postBuild
du -sh "$VENV" | sed 's/^/venv size: /'

echo "== binder/start: $NOTEBOOK"
binder/start python - "$NOTEBOOK" "$SCRATCH/out" "$LIMIT_MB" <<'PY'
import resource, subprocess, sys, time
notebook, out, limit_mb = sys.argv[1], sys.argv[2], int(sys.argv[3])
start = time.time()
code = subprocess.call([sys.executable, "-m", "jupyter", "nbconvert", "--to", "notebook", "--execute", notebook,
                        "--output-dir", out, "--ExecutePreprocessor.timeout=1800"])
peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024  # the kernel included (reaped)
print(f"{notebook}: exit {code} in {time.time() - start:.0f} s; peak memory of one process {peak_mb:.0f} MB "
      f"(Binder: {limit_mb} MB)")
if code == 0 and peak_mb > 0.9 * limit_mb:
    print(f"too close to Binder's memory limit: {peak_mb:.0f} MB of {limit_mb} MB")
    code = 1
sys.exit(code)
PY

echo "== mor-lab lab --check"
binder/start mor-lab lab --check
echo "check_binder: passed in $(( $(date +%s) - start )) s"
