#!/usr/bin/env bash
# One prepared GPU check (under 8 minutes): the kernel tests un-interpreted on CUDA, the kernels benchmark
# (each kernel vs its reference, ragged attention vs padded SDPA, multi-LoRA vs a dense matmul, the CDB
# engine with kernels vs without), and the quick CDB benchmark. JSON goes to $OUT if set, else docs/bench.
# Usage: bash scripts/gpu_check.sh   (from anywhere; uses ./.venv when present)
set -uo pipefail
cd "$(dirname "$0")/.."
[ -f .venv/bin/activate ] && . .venv/bin/activate
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1} TOKENIZERS_PARALLELISM=false
unset TRITON_INTERPRET  # native kernels
DEST=${OUT:-docs/bench}
mkdir -p "$DEST"
python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA GPU: nothing to check here')" || exit 2
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$DEST/gpu.txt"
status=0
echo "== kernel tests (native Triton on CUDA) =="
timeout 150 python -m pytest -q -p no:cacheprovider tests/test_kernels.py --junitxml="$DEST/kernels-tests-gpu.xml" || status=1
echo "== mor-lab bench kernels =="
timeout 180 mor-lab bench kernels --json "$DEST/kernels-gpu.json" > /dev/null || status=1
python - "$DEST/kernels-gpu.json" <<'PY' || true
import json, sys
r = json.load(open(sys.argv[1]))
print("peaks:", r.get("peaks"))
for row in r["results"]:
    print(f"{row['kernel']:38s} {row['kernel_ms']:>9.4f} ms  x{row['speedup']:<6} {row['gb_per_s']:>8} GB/s "
          f"({row['bandwidth_fraction']:.0%})  {row['tflop_per_s']:>7} TFLOP/s  {row.get('vs_dense_matmul', '')}")
for row in r.get("engine", []):
    print(row)
print("interpreter-free correctness all ok:", r["correctness"]["all_ok"])
PY
echo "== mor-lab bench cdb --quick =="
timeout 150 mor-lab bench cdb --quick --json "$DEST/cdb-gpu-quick.json" > /dev/null || status=1
echo "JSON in $DEST (status $status)"
exit $status
