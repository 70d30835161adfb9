"""Start JupyterLab or Voila on 127.0.0.1 (free port, random token, no browser) and Debian's Chromium.

Used by the browser tests; importable on its own to drive a notebook by hand:

    with jupyter_lab(root) as lab, chromium() as browser:
        page = browser.new_page(); page.goto(lab.url("lab/tree/notebooks/00_tour.ipynb"))
"""
from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

CHROMIUM = os.environ.get("MOR_LAB_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--no-first-run", "--disable-sync", "--disable-quic",
                  "--disable-dev-shm-usage"]

# JupyterLab user settings for a test run: every cell stays in the DOM (no windowing), nothing is
# autosaved back to the notebook files, no news or update toasts over the screenshots.
LAB_SETTINGS = {
    "@jupyterlab/notebook-extension/tracker.jupyterlab-settings": {"windowingMode": "none"},
    "@jupyterlab/docmanager-extension/plugin.jupyterlab-settings": {"autosave": False},
    "@jupyterlab/apputils-extension/notification.jupyterlab-settings": {"fetchNews": "false",
                                                                        "checkForUpdates": False},
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    process: subprocess.Popen
    port: int
    token: str
    log: Path

    def url(self, path: str = "", **query) -> str:
        query = {"token": self.token, **query} if self.token else query
        q = "&".join(f"{k}={v}" for k, v in query.items())
        return f"http://127.0.0.1:{self.port}/{path.lstrip('/')}" + (f"?{q}" if q else "")

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return self.log.read_text(errors="replace")[-chars:]
        except OSError:
            return ""


def _wait_http(server: Server, path: str | None, timeout: float) -> None:
    """Until ``path`` answers 200, or with ``path=None`` until the port accepts connections (a Voila
    page request would start a kernel and run the notebook just to check readiness)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(f"server exited with {server.process.returncode}:\n{server.log_tail()}")
        if path is None:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", server.port)) == 0:
                    return
            time.sleep(0.5)
            continue
        try:
            with urllib.request.urlopen(server.url(path), timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"server did not answer {path} within {timeout:.0f} s:\n{server.log_tail()}")


@contextlib.contextmanager
def _serve(cmd: list[str], port: int, token: str, log: Path, ready_path: str | None, env: dict, cwd: Path,
           timeout: float = 120):
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=cwd,
                                start_new_session=True)
    server = Server(proc, port, token, log)
    try:
        _wait_http(server, ready_path, timeout)
        yield server
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)  # the server and the kernels it started
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def server_env(extra: dict | None = None) -> dict:
    env = dict(os.environ)
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.setdefault("MOR_LAB_QUICK", "1")
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


@contextlib.contextmanager
def jupyter_lab(root: Path, workdir: Path, env: dict | None = None):
    """JupyterLab serving ``root`` with test settings (``workdir`` holds its settings, runtime files, log)."""
    settings = workdir / "user-settings"
    for name, value in LAB_SETTINGS.items():
        path = settings / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(value))
    port, token = free_port(), secrets.token_hex(16)
    env = server_env(env)
    env["JUPYTER_RUNTIME_DIR"] = str(workdir / "runtime")
    env["JUPYTERLAB_WORKSPACES_DIR"] = str(workdir / "workspaces")
    cmd = [sys.executable, "-m", "jupyterlab", "--no-browser", "--ip=127.0.0.1", f"--port={port}",
           f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={root}",
           f"--LabApp.user_settings_dir={settings}", f"--LabApp.workspaces_dir={workdir / 'workspaces'}",
           "--LabApp.expose_app_in_browser=True", "--ServerApp.port_retries=0",
           "--LabServerApp.announcements_url=''", "--ServerApp.open_browser=False"]
    if os.geteuid() == 0:
        cmd.append("--allow-root")
    with _serve(cmd, port, token, workdir / "jupyterlab.log", "api/status", env, root) as server:
        yield server


@contextlib.contextmanager
def voila(notebook: Path, workdir: Path, env: dict | None = None, command: list[str] | None = None):
    """``mor-lab explore`` (Voila over ``notebook``) on a free port; yields the Server (no token)."""
    port = free_port()
    cmd = command or [sys.executable, "-m", "mor_lab.cli", "explore", "--no-browser", f"--port={port}",
                      f"--notebook={notebook}"]
    with _serve(cmd, port, "", workdir / "voila.log", None, server_env(env), notebook.parent, timeout=120) as server:
        yield server


def chromium_missing() -> str | None:
    """Why the browser tests cannot run here, or None."""
    if not Path(CHROMIUM).exists():
        return f"no Chromium at {CHROMIUM} (Debian: apt-get install -y chromium)"
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "the playwright package is missing (pip install -e '.[test]')"
    return None


@contextlib.contextmanager
def chromium(profile: Path):
    """Debian's headless Chromium under Playwright (never a downloaded browser)."""
    from playwright.sync_api import sync_playwright

    if shutil.which(CHROMIUM) is None and not Path(CHROMIUM).exists():
        raise RuntimeError(chromium_missing())
    with sync_playwright() as p:
        context = p.chromium.launch_persistent_context(
            str(profile), executable_path=CHROMIUM, headless=True, args=CHROMIUM_FLAGS,
            viewport={"width": 1400, "height": 1000}, device_scale_factor=1)
        try:
            yield context
        finally:
            context.close()
