"""scripts/gpu_check.sh, the one prepared GPU check: its syntax, its time budget, and its CPU smoke mode.

The smoke mode runs the script's stages with tiny settings on this CPU (Triton's interpreter), so the
stage plumbing (timeouts, logs, summary.json rewritten after each stage, failures recorded without
stopping the rest, the budget) is tested before a GPU session spends its minutes on it.
"""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "gpu_check.sh"


def run(tmp_path, stages, **env):
    environment = {**os.environ, "GPU_CHECK_CPU_SMOKE": "1", "GPU_CHECK_OUT": str(tmp_path),
                   "GPU_CHECK_PYTHON": sys.executable, "GPU_CHECK_STAGES": stages, **env}
    environment.pop("OUT", None)
    done = subprocess.run(["bash", str(SCRIPT)], env=environment, capture_output=True, text=True, timeout=240)
    summary = json.loads((tmp_path / "summary.json").read_text())
    return done, summary, {s["stage"]: s for s in summary["stages"]}


def test_script_parses():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)


def test_gpu_timeouts_fit_seven_minutes():
    text = SCRIPT.read_text()
    gpu_limits = re.search(r"else\s+unset TRITON_INTERPRET.*?declare -A LIMIT=\((.*?)\)", text, re.S).group(1)
    limits = dict(re.findall(r"\[([\w-]+)\]=(\d+)", gpu_limits))
    stages = re.search(r'ALL_STAGES="([^"]*)"', text).group(1).split()
    assert "STAGES=${GPU_CHECK_STAGES:-$ALL_STAGES}" in text
    assert set(stages) == set(limits)
    kill_grace = int(re.search(r"timeout -k (\d+)", text).group(1))
    assert sum(map(int, limits.values())) + kill_grace * len(limits) <= 7 * 60
    assert re.search(r"BUDGET=\$\{GPU_CHECK_BUDGET_S:-420\}", text)


def test_without_a_gpu_the_script_refuses_unless_smoke(tmp_path):
    if __import__("torch").cuda.is_available():
        pytest.skip("a GPU is present")
    env = {**os.environ, "GPU_CHECK_OUT": str(tmp_path), "GPU_CHECK_PYTHON": sys.executable}
    done = subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "no CUDA GPU" in done.stderr


def test_failures_are_recorded_and_the_budget_is_kept(tmp_path):
    done, summary, stages = run(tmp_path / "a", "nonsense cdb-on versions", GPU_CHECK_ENGINE_ARGS="--no-such-flag")
    assert done.returncode == 1 and not summary["all_passed"]
    assert stages["nonsense"]["status"] == "failed" and "unknown stage" in stages["nonsense"]["note"]
    assert stages["cdb-on"]["status"] == "failed" and stages["cdb-on"]["rc"] == 2
    assert "unrecognized arguments: --no-such-flag" in (tmp_path / "a" / "cdb-on.log").read_text()
    assert stages["versions"]["status"] == "passed"  # ran after the failures
    assert summary["versions"]["torch"]
    done, summary, stages = run(tmp_path / "b", "versions bench-kernels", GPU_CHECK_BUDGET_S="1")
    assert done.returncode == 0
    assert [s["status"] for s in summary["stages"]] == ["skipped: budget spent"] * 2


def test_cpu_smoke_of_the_kernel_stages(tmp_path):
    done, summary, stages = run(tmp_path, "kernel-tests sanitizer bench-kernels")
    assert done.returncode == 0, done.stdout[-3000:]
    assert summary["mode"] == "cpu-smoke" and summary["all_passed"]
    tests = stages["kernel-tests"]["tests"]
    assert [t["file"] for t in tests] == [f"kernel-tests-{g}.xml" for g in ("bf16", "fp16", "fp32", "other")]
    assert all(t["tests"] >= 1 and t["failures"] == t["errors"] == 0 for t in tests)
    assert stages["sanitizer"]["status"] == "skipped: no GPU"
    assert "paged_chunk_attention" in (tmp_path / "sanitizer.log").read_text()
    assert stages["bench-kernels"]["status"] == "passed"
    assert stages["bench-kernels"]["report"]["all_ok"] is True
    assert (tmp_path / "bench-kernels.log").read_text().count("timings need a CUDA GPU") == 1
