#!/usr/bin/env bash
# The one prepared GPU check of mor_lab (issue 15): at most 7 minutes on a lent H200, so it can be rerun once.
#
# The GPU machine has torch, triton, pytest and transformers, no package index and no mor_lab install, no
# SmolLM2 package, and `python3` (not `python`): everything runs as `python3 -m ...` with PYTHONPATH set to
# this checkout, on random weights at SmolLM2's shape. Every stage has its own timeout, its output is tee'd
# into the results folder, and summary.json is rewritten after each stage, so a run killed at any point
# still leaves its results. A stage that fails is recorded and the next one runs.
#
#   stage          budget  what
#   versions         15 s  nvidia-smi; torch, triton, CUDA, cuDNN, driver, GPU (versions.json)
#   kernel-tests     75 s  tests/test_kernels*.py natively (no TRITON_INTERPRET): fp32, fp16, bf16 and the
#                          rest as four parallel pytest runs (their Triton compiles share the 16 CPU cores)
#   regressions      40 s  a training step with kernels on vs off (gradients present and equal; SmolLM2
#                          shape in bf16 too), a transposed/strided q, a cache and every row kernel past
#                          2^31 elements (tests/test_kernels_large.py)
#   sanitizer        40 s  compute-sanitizer --tool memcheck on one small call of every kernel
#   bench-kernels    80 s  python3 -m mor_lab.cli bench kernels (medians, CUDA graphs, fair padded SDPA,
#                          measured and nominal peaks, launch-setting sweeps, targets)
#   cdb-on/off    38+38 s  bench cdb at SmolLM2's shape in bf16, batch 8/32/128, kernels on / off
#   mor-on/off    32+32 s  bench mor, the same
#   total           390 s  (+2 s kill grace per stage); a stage never runs past GPU_CHECK_BUDGET_S (420)
#
# Environment:
#   GPU_CHECK_OUT        results folder (default: $OUT when set, else ./gpu-check-results)
#   GPU_CHECK_PYTHON     interpreter (default python3)
#   GPU_CHECK_STAGES     the stages to run, space-separated (default: all, in the order above)
#   GPU_CHECK_BUDGET_S   total seconds (default 420); later stages get what is left
#   GPU_CHECK_ENGINE_ARGS  arguments of the engine benchmarks (default: --random-weights --dtype bfloat16)
#   GPU_CHECK_BATCHES    their batch sizes (default 8,32,128)
#   GPU_CHECK_CPU_SMOKE=1  run every stage with tiny settings on a CPU (Triton's interpreter); stages that need
#                          CUDA record "skipped: no GPU". tests/test_kernels_gpu_script.py runs this mode.
# Exit status: 0 when every stage that ran passed, 1 otherwise.
set -uo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
cd "$REPO"
PY=${GPU_CHECK_PYTHON:-python3}
SMOKE=${GPU_CHECK_CPU_SMOKE:-0}
RESULTS=${GPU_CHECK_OUT:-${OUT:-$REPO/gpu-check-results}}
mkdir -p "$RESULTS" && RESULTS=$(cd "$RESULTS" && pwd)
BUDGET=${GPU_CHECK_BUDGET_S:-420}
ALL_STAGES="versions kernel-tests regressions sanitizer bench-kernels cdb-on cdb-off mor-on mor-off"
STAGES=${GPU_CHECK_STAGES:-$ALL_STAGES}
ENGINE_ARGS=${GPU_CHECK_ENGINE_ARGS:---random-weights --dtype bfloat16 --repeats 1 --max-new-tokens 32 --shapes none}
BATCHES=${GPU_CHECK_BATCHES:-8,32,128}
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
# no plugin autoload: ~4 s less per pytest start (nbval, playwright, ... are not used by the kernel tests)
PYTEST=(env PYTEST_DISABLE_PLUGIN_AUTOLOAD=1 "$PY" -m pytest -q -p no:cacheprovider -o addopts= --tb=short)

if [ "$SMOKE" = 1 ]; then
    export TRITON_INTERPRET=1 MOR_LAB_QUICK=1
    ENGINE_ARGS=${GPU_CHECK_ENGINE_ARGS:---random-weights --dtype float32 --quick}
    BATCHES=${GPU_CHECK_BATCHES:-2}
    declare -A LIMIT=([versions]=30 [kernel-tests]=90 [regressions]=90 [sanitizer]=60 [bench-kernels]=90
                      [cdb-on]=120 [cdb-off]=120 [mor-on]=120 [mor-off]=120)
    BUDGET=${GPU_CHECK_BUDGET_S:-900}
else
    unset TRITON_INTERPRET  # native kernels
    declare -A LIMIT=([versions]=15 [kernel-tests]=75 [regressions]=40 [sanitizer]=40 [bench-kernels]=80
                      [cdb-on]=38 [cdb-off]=38 [mor-on]=32 [mor-off]=32)
fi
GPU=$("$PY" -c "import torch; print(int(torch.cuda.is_available()))" 2>/dev/null || echo 0)
if [ "$GPU" != 1 ] && [ "$SMOKE" != 1 ]; then
    echo "gpu_check: no CUDA GPU here (for the CPU self-test: GPU_CHECK_CPU_SMOKE=1)" >&2
    exit 2
fi

: > "$RESULTS/stages.tsv"
START=$SECONDS

summarize() {  # summary.json from stages.tsv, the pytest junit files and the benchmark JSONs
    "$PY" - "$RESULTS" "$SMOKE" "$BUDGET" <<'PY' || echo "gpu_check: could not write summary.json" >&2
import json, sys, time
import xml.etree.ElementTree as ET
from pathlib import Path

results, smoke, budget = Path(sys.argv[1]), sys.argv[2] == "1", int(sys.argv[3])


def junit(path):
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError) as e:
        return {"file": path.name, "error": f"{type(e).__name__}: {e}"}
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    failed = [f"{c.get('classname')}::{c.get('name')}" for c in suite.iter("testcase")
              if c.find("failure") is not None or c.find("error") is not None]
    return {"file": path.name, **counts, "failed": failed[:30]}


def bench(path):
    try:
        report = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        return {"file": path.name, "error": f"{type(e).__name__}: {e}"}
    out = {"file": path.name, "mode": report.get("mode"), "all_ok": report.get("all_ok")}
    if "targets" in report:
        out["targets"] = report["targets"]
    failed = [r.get("kernel") for r in report.get("results", []) if r.get("ok") is False]
    if failed:
        out["failed_rows"] = failed
    return out


stages = []
for line in (results / "stages.tsv").read_text().splitlines():
    name, status, rc, seconds, note = (line.split("\t") + [""] * 5)[:5]
    stage = {"stage": name, "status": status, "rc": int(rc) if rc.lstrip("-").isdigit() else None,
             "seconds": int(seconds) if seconds.isdigit() else None, "log": f"{name}.log"}
    if note:
        stage["note"] = note
    tests = [junit(p) for p in sorted(results.glob(f"{name}*.xml"))]
    if tests:
        stage["tests"] = tests
    report = results / f"{name}.json"  # bench-kernels.json, cdb-on.json, ...
    if report.is_file() and name != "versions":
        stage["report"] = bench(report)
    stages.append(stage)
versions = results / "versions.json"
summary = {"check": "scripts/gpu_check.sh", "mode": "cpu-smoke" if smoke else "gpu", "budget_s": budget,
           "written": time.strftime("%Y-%m-%d %H:%M:%S"),
           "versions": json.loads(versions.read_text()) if versions.is_file() else None,
           "all_passed": all(s["status"] == "passed" or s["status"].startswith("skipped") for s in stages),
           "stages": stages}
(results / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
PY
}

record() {  # name status rc seconds note
    printf '%s\t%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" "${5:-}" >> "$RESULTS/stages.tsv"
    echo "-- $1: $2 (${4}s)${5:+ - $5}"
    summarize
}

limit_for() {  # the stage's timeout, cut to what is left of the budget
    local left=$((BUDGET - (SECONDS - START) - 2)) want=${LIMIT[$1]}
    echo $((want < left ? want : left))
}

status_of() {  # rc -> status word
    case $1 in
        0) echo passed ;;
        124|137) echo "timeout" ;;
        *) echo "failed" ;;
    esac
}

run_stage() {  # name command...: one timed command, tee'd into name.log
    local name=$1; shift
    local limit; limit=$(limit_for "$name")
    if [ "$limit" -le 0 ]; then record "$name" "skipped: budget spent" "" 0; return 1; fi
    local t0=$SECONDS
    { echo "== $name (timeout ${limit}s): $*"; } | tee "$RESULTS/$name.log"
    timeout -k 2 "$limit" "$@" 2>&1 | tee -a "$RESULTS/$name.log"
    local rc=${PIPESTATUS[0]}
    STAGE_RC=$rc
    STAGE_SECONDS=$((SECONDS - t0))
    return 0
}

finish_stage() {  # name [note]: record the last run_stage's outcome
    local status; status=$(status_of "$STAGE_RC")
    [ "$status" = timeout ] && status="timeout after ${STAGE_SECONDS}s"
    record "$1" "$status" "$STAGE_RC" "$STAGE_SECONDS" "${2:-}"
}

stage_versions() {
    run_stage versions bash -c '
        if command -v nvidia-smi >/dev/null; then
            nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,clocks.max.mem,power.limit --format=csv
            nvidia-smi
        else
            echo "nvidia-smi: not found"
        fi
        "$0" - "$1" <<'"'PY'"'
import json, platform, subprocess, sys
import torch
info = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available()}
try:
    import triton
    info["triton"] = triton.__version__
except ImportError:
    info["triton"] = None
try:
    import transformers
    info["transformers"] = transformers.__version__
except ImportError:
    info["transformers"] = None
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    info.update(gpu=p.name, capability=f"{p.major}.{p.minor}", sms=p.multi_processor_count,
                memory_gib=round(p.total_memory / 2**30, 1), cudnn=torch.backends.cudnn.version())
    try:
        info["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                        capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        info["driver"] = None
sanitizer = subprocess.run(["bash", "-c", "command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer"],
                           capture_output=True, text=True).stdout.split()
info["compute_sanitizer"] = sanitizer[0] if sanitizer else None
json.dump(info, open(sys.argv[1], "w"), indent=2)
print(json.dumps(info, indent=2))
PY
    ' "$PY" "$RESULTS/versions.json" || return 0
    finish_stage versions
}

stage_kernel_tests() {  # four pytest runs at once: fp32, fp16, bf16, and the tests without a dtype
    local limit; limit=$(limit_for kernel-tests)
    if [ "$limit" -le 0 ]; then record kernel-tests "skipped: budget spent" "" 0; return; fi
    local t0=$SECONDS files=(tests/test_kernels.py tests/test_kernels_bench.py) pids=() groups=(fp32 fp16 bf16 other)
    echo "== kernel-tests (timeout ${limit}s): ${files[*]} natively, by dtype" | tee "$RESULTS/kernel-tests.log"
    for group in "${groups[@]}"; do
        local select=$group
        [ "$group" = other ] && select="not fp32 and not fp16 and not bf16"
        [ "$SMOKE" = 1 ] && select="($select) and ((test_rms_norm and 1-5) or dispatch_override)"
        timeout -k 2 "$limit" "${PYTEST[@]}" "${files[@]}" -k "$select" \
            --junitxml="$RESULTS/kernel-tests-$group.xml" > "$RESULTS/kernel-tests-$group.log" 2>&1 &
        pids+=($!)
    done
    local rc=0 i
    for i in "${!pids[@]}"; do
        wait "${pids[$i]}"; local r=$?
        { echo "--- ${groups[$i]} (rc $r)"; tail -n 40 "$RESULTS/kernel-tests-${groups[$i]}.log"; } |
            tee -a "$RESULTS/kernel-tests.log"
        [ $r -ne 0 ] && [ $rc -eq 0 -o $r -eq 124 -o $r -eq 137 ] && rc=$r
    done
    STAGE_RC=$rc STAGE_SECONDS=$((SECONDS - t0))
    finish_stage kernel-tests "per-dtype logs: kernel-tests-{fp32,fp16,bf16,other}.log"
}

stage_regressions() {
    local select="kernels_autograd or strided or 2_31 or kernels_large"
    [ "$SMOKE" = 1 ] && select="training_step_gets or strided or 2_31"
    run_stage regressions "${PYTEST[@]}" tests/test_kernels_autograd.py tests/test_kernels.py tests/test_kernels_large.py \
        -k "$select" -rs --junitxml="$RESULTS/regressions.xml" || return 0
    finish_stage regressions
}

write_sanitizer_calls() {  # one small call of every kernel (bf16, odd shapes), each checked against its reference
    cat > "$RESULTS/sanitizer_calls.py" <<'PY'
import os
import sys

import torch

cuda = torch.cuda.is_available()
if not cuda:
    os.environ.setdefault("TRITON_INTERPRET", "1")
from mor_lab import kernels  # noqa: E402
from mor_lab.kernels import attention, multi_lora, rmsnorm, rotary, router, swiglu  # noqa: E402

dev, dt = ("cuda" if cuda else "cpu"), torch.bfloat16
g = torch.Generator().manual_seed(0)


def r(*shape, dtype=dt):
    return torch.randn(*shape, generator=g).to(device=dev, dtype=dtype)


def check(name, got, want, tol=3e-2):
    err = (got.float() - want.float()).abs().max().item() if got.numel() else 0.0
    ok = torch.allclose(got.float(), want.float(), atol=tol, rtol=tol)
    print(f"{name:28s} max err {err:.3g} {'ok' if ok else 'MISMATCH'}")
    return ok


with kernels.use("triton"), torch.inference_mode():
    x, w, res = r(5, 37), r(37) + 1, r(5, 37)
    oks = [check("rms_norm", rmsnorm.rms_norm(x, w, 1e-5), rmsnorm.rms_norm_reference(x, w, 1e-5)),
           check("add_rms_norm", rmsnorm.add_rms_norm(x, res, w, 1e-5)[0],
                 rmsnorm.add_rms_norm_reference(x, res, w, 1e-5)[0]),
           check("silu_mul", swiglu.silu_mul(res, x), swiglu.silu_mul_reference(res, x))]
    q, ang = r(5, 3, 10), r(5, 1, 10, dtype=torch.float32)
    oks.append(check("apply_rotary", rotary.apply_rotary(q, ang.cos().to(dt), ang.sin().to(dt)),
                     rotary.apply_rotary_reference(q, ang.cos().to(dt), ang.sin().to(dt))))
    h, idx = r(37, 123), torch.tensor([3, 0, 3, 36], device=dev)
    out, gate = r(4, 123), torch.rand(4, generator=g).to(dev)
    oks.append(check("router_gather", router.router_gather(h, idx), router.router_gather_reference(h, idx)))
    oks.append(check("gated_scatter_add", router.gated_scatter_add(h.clone(), idx, out, gate),
                     router.gated_scatter_add_reference(h.clone(), idx, out, gate)))
    xl, wl = r(5, 40), r(37, 40) / 6
    a, b, ids = r(3, 4, 40) / 6, r(3, 37, 4), torch.tensor([0, -1, 2, 1, 0], device=dev)
    s = torch.tensor([0.5, 1.0, 2.0], device=dev)
    oks.append(check("multi_lora_linear", multi_lora.multi_lora_linear(xl, wl, None, a, b, ids, s),
                     multi_lora.multi_lora_linear_reference(xl, wl, None, a, b, ids, s), 8e-2))
    k, v = r(9, 2, 8, 16), r(9, 2, 8, 16)
    table = torch.tensor([[4, 1, 7], [0, 0, 0], [2, 8, 3]], device=dev, dtype=torch.int32)
    lens = torch.tensor([19, 0, 24], device=dev, dtype=torch.int32)
    qd = r(4, 3, 16).transpose(0, 1)  # [3, 4, 16], not contiguous
    want = attention.paged_decode_attention_reference(qd, k, v, table, lens)
    for splits in (1, 3):
        oks.append(check(f"paged_decode_attention/{splits}",
                         attention.paged_decode_attention(qd, k, v, table, lens, num_splits=splits), want))
    starts = torch.tensor([0, 5, 5, 9], device=dev)
    qc = r(9, 4, 16)
    oks.append(check("paged_chunk_attention", attention.paged_chunk_attention(qc, k, v, table, lens, starts,
                                                                              max_query_len=5),
                     attention.paged_chunk_attention_reference(qc, k, v, table, lens, starts)))
    if cuda:
        torch.cuda.synchronize()
sys.exit(0 if all(oks) else 1)
PY
}

stage_sanitizer() {
    write_sanitizer_calls
    local sanitizer
    sanitizer=$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -n 1)
    if [ "$GPU" != 1 ]; then
        run_stage sanitizer "$PY" "$RESULTS/sanitizer_calls.py" || return 0
        local status; status=$(status_of "$STAGE_RC")
        [ "$status" = passed ] && status="skipped: no GPU"
        record sanitizer "$status" "$STAGE_RC" "$STAGE_SECONDS" "the calls ran under Triton's interpreter instead"
    elif [ -z "$sanitizer" ]; then
        run_stage sanitizer "$PY" "$RESULTS/sanitizer_calls.py" || return 0
        local status; status=$(status_of "$STAGE_RC")
        [ "$status" = passed ] && status="skipped: compute-sanitizer not found"
        record sanitizer "$status" "$STAGE_RC" "$STAGE_SECONDS" "the calls ran natively without memcheck"
    else
        # no caching allocator: memcheck then sees each tensor's own bounds
        run_stage sanitizer env PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$sanitizer" --tool memcheck --error-exitcode 3 \
            --print-limit 20 --leak-check no "$PY" "$RESULTS/sanitizer_calls.py" || return 0
        finish_stage sanitizer "$sanitizer"
    fi
}

stage_bench_kernels() {
    local json="$RESULTS/bench-kernels.json"
    rm -f "$json"
    run_stage bench-kernels "$PY" -m mor_lab.cli bench kernels --json "$json" || return 0
    local note=""
    if [ "$STAGE_RC" = 0 ]; then  # the checks inside the report decide too
        "$PY" -c "import json, sys; sys.exit(0 if json.load(open(sys.argv[1]))['all_ok'] else 3)" "$json" || {
            STAGE_RC=3; note="a timed output did not match its reference (all_ok false): see failed_rows"; }
    fi
    finish_stage bench-kernels "$note"
}

stage_engine() {  # suite kernels(on|off)
    local name="$1-$2" json="$RESULTS/$1-$2.json"
    rm -f "$json"
    # shellcheck disable=SC2086  # ENGINE_ARGS is a list of flags
    run_stage "$name" "$PY" -m mor_lab.cli bench "$1" $ENGINE_ARGS --batch-sizes "$BATCHES" --kernels "$2" \
        --json "$json" || return 0
    finish_stage "$name" "python3 -m mor_lab.cli bench $1 $ENGINE_ARGS --batch-sizes $BATCHES --kernels $2"
}

echo "gpu_check: results in $RESULTS ($([ "$SMOKE" = 1 ] && echo "CPU smoke mode" || echo "GPU"), budget ${BUDGET}s)"
for stage in $STAGES; do
    case $stage in
        versions) stage_versions ;;
        kernel-tests) stage_kernel_tests ;;
        regressions) stage_regressions ;;
        sanitizer) stage_sanitizer ;;
        bench-kernels) stage_bench_kernels ;;
        cdb-on|cdb-off|mor-on|mor-off) stage_engine "${stage%-*}" "${stage#*-}" ;;
        *) record "$stage" "failed" 2 0 "unknown stage (known: ${ALL_STAGES})" ;;
    esac
done
summarize
echo "gpu_check: done in $((SECONDS - START))s; summary: $RESULTS/summary.json"
"$PY" -c "import json, sys; sys.exit(0 if json.load(open(sys.argv[1]))['all_passed'] else 1)" "$RESULTS/summary.json"
