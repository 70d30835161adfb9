"""``mor-lab bench kernels``: the CPU correctness pass, and failures that surface instead of hiding.

The GPU timing path runs in scripts/gpu_check.sh; here: the interpreter pass through the CLI, a case that
raises or computes wrong values failing the report (the old suite reported an ImportError as "skipped"),
and the target rules.
"""
import json
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

pytest.importorskip("triton")

from mor_lab import kernels  # noqa: E402
from mor_lab.bench import kernels as bench  # noqa: E402


def test_cli_without_gpu_runs_the_correctness_pass(tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("the GPU path is exercised by scripts/gpu_check.sh")
    from mor_lab.cli import main
    out = tmp_path / "kernels.json"
    assert main(["bench", "kernels", "--json", str(out)]) == 0
    assert "timings need a CUDA GPU" in capsys.readouterr().err
    report = json.loads(out.read_text())
    assert report["suite"] == "kernels" and report["mode"] == "interpreter-correctness"
    assert report["versions"]["triton"] and report["versions"]["torch"] == torch.__version__
    names = {r["kernel"].split("[")[0] for r in report["results"]}
    assert set(kernels.KERNELS) <= names
    assert {r["dtype"] for r in report["results"]} == {"float32", "float16", "bfloat16"}
    assert report["all_ok"] and all(r["ok"] for r in report["results"])
    baselines = [b for r in report["results"] for b in r.get("baselines", {}).values()]
    assert baselines and all(b["ok"] for b in baselines)  # the padded SDPA and dense matmul outputs checked too


def fake_cases(kernel, name="broken"):
    def cases(device, dtype, small):
        x = torch.arange(6.0, device=device).to(dtype)
        yield bench.Case(name, lambda: kernel(x), lambda: x * 2, 0, 0, "[6]")
        yield bench.Case("fine", lambda: x * 2, lambda: x * 2, 0, 0, "[6]")
    return cases


def test_a_case_that_raises_fails_the_report_instead_of_being_skipped(monkeypatch, capsys):
    def missing(x):
        from mor_lab.bench.common import _no_such_helper  # noqa: F401 - like the old suite's `_timed`
    monkeypatch.setattr(bench, "cases", fake_cases(missing))
    rows = bench.correctness_pass(dtypes=(torch.float32,), device="cpu")
    broken, fine = rows
    assert not broken["ok"] and broken["error"].startswith("ImportError") and "_no_such_helper" in broken["error"]
    assert fine["ok"]
    assert "skipped" not in json.dumps(rows)
    if not torch.cuda.is_available():
        report = bench.run()
        assert not report["all_ok"] and "CHECK FAILED for broken" in capsys.readouterr().err


def test_a_wrong_output_fails_its_row(monkeypatch):
    monkeypatch.setattr(bench, "cases", fake_cases(lambda x: x * 2 + 1e-3))
    broken, fine = bench.correctness_pass(dtypes=(torch.float32,), device="cpu")
    assert not broken["ok"] and broken["max_abs_err"] == pytest.approx(1e-3, rel=1e-2) and fine["ok"]


def test_targets_say_met_or_missed_with_the_measured_figure():
    rows = [{"kernel": "paged_decode_attention[full]", "fraction_of_nominal_bandwidth": 0.71},
            {"kernel": "paged_decode_attention[ragged]", "fraction_of_nominal_bandwidth": 0.5,
             "baselines": {"padded_sdpa": {"kernel_over_baseline": 0.8, "backend": "EFFICIENT_ATTENTION"}}},
            {"kernel": "multi_lora_linear[m=64]", "baselines": {"dense_matmul": {"kernel_over_baseline": 1.4}}},
            {"kernel": "paged_decode_attention[smollm2-ragged]", "ok": False, "error": "RuntimeError: ..."}]
    full_bw, ragged_bw, ragged_speed, smollm2_speed, lora = bench.targets(rows)
    assert full_bw["met"] and full_bw["measured"] == 0.71
    assert not ragged_bw["met"] and ragged_bw["measured"] == 0.5
    assert ragged_speed["met"] and ragged_speed["measured"] == 1.25 and "EFFICIENT_ATTENTION" in ragged_speed["target"]
    assert smollm2_speed["measured"] is None and not smollm2_speed["met"]  # its row failed: not met
    assert not lora["met"] and lora["measured"] == 1.4


def test_an_unknown_dtype_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown dtype 'bf17'"):
        bench.run(dtype="bf17")


def test_op_traffic_sees_the_reference_read_the_shared_weight_once():
    x, w = torch.randn(6, 8), torch.randn(5, 8)
    a, b = torch.randn(2, 2, 8), torch.randn(2, 5, 2)
    ids, scales = torch.tensor([0, 1, -1, 0, 1, 1]), torch.ones(2)
    ops = bench.op_traffic(kernels.multi_lora.multi_lora_linear_reference, x, w, None, a, b, ids, scales, watch=w)
    assert sum(o["reads_watched"] for o in ops) == 1  # one dense matmul over every row
    assert sum(o["op"] == "mm" for o in ops) == 1 + 2 * 2  # then a shrink and an expand per adapter present
    assert all(o["bytes"] > 0 for o in ops)
