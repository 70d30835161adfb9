"""Browser fixtures: one JupyterLab and one headless Chromium for the whole session.

The notebooks are run from a scratch copy of the repository layout (notebooks copied, every other
top-level entry linked), so nothing the browser does is ever saved into the real notebooks.
Screenshots and per-notebook timings go to tests/browser/screenshots/ (git-ignored).
Without Chromium the tests skip, unless MOR_LAB_REQUIRE_BROWSER=1 (CI) makes that a failure.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from .servers import chromium, chromium_missing, jupyter_lab

REPO = Path(__file__).resolve().parents[2]
SHOTS = Path(os.environ.get("MOR_LAB_SCREENSHOTS", REPO / "tests" / "browser" / "screenshots"))


def pytest_collection_modifyitems(items):
    for item in items:
        if "tests/browser" in str(item.fspath).replace(os.sep, "/"):
            item.add_marker(pytest.mark.browser)


@pytest.fixture(scope="session")
def browser_ready():
    why = chromium_missing()
    if why:
        if os.environ.get("MOR_LAB_REQUIRE_BROWSER", "") not in ("", "0"):
            pytest.fail(f"browser tests required but cannot run: {why}")
        pytest.skip(why)


@pytest.fixture(scope="session")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("browser")


@pytest.fixture(scope="session")
def lab_root(workdir) -> Path:
    """``<tmp>/repo``: a copy of notebooks/, links to everything else the notebooks may read."""
    root = workdir / "repo"
    root.mkdir()
    for entry in REPO.iterdir():
        if entry.name in ("notebooks", ".git", ".venv"):
            continue
        (root / entry.name).symlink_to(entry)
    shutil.copytree(REPO / "notebooks", root / "notebooks",
                    ignore=shutil.ignore_patterns(".ipynb_checkpoints", "__pycache__"))
    return root


@pytest.fixture(scope="session")
def lab(browser_ready, lab_root, workdir):
    with jupyter_lab(lab_root, workdir / "lab") as server:
        yield server


@pytest.fixture(scope="session")
def browser(browser_ready, workdir):
    with chromium(workdir / "chromium-profile") as context:
        yield context


@pytest.fixture(scope="session")
def shots() -> Path:
    SHOTS.mkdir(parents=True, exist_ok=True)
    return SHOTS


@pytest.fixture(scope="session")
def timings(shots):
    record: dict = {}
    yield record
    path = shots / "timings.json"
    old = json.loads(path.read_text()) if path.exists() else {}
    path.write_text(json.dumps({**old, **record}, indent=1))
