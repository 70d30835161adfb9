"""Every notebook, run in JupyterLab in headless Chromium, as a user would: what nbval cannot see.

For each ``notebooks/*.ipynb`` (found by glob, so new notebooks are covered without editing this
file): open it, Run All in the quick setting, wait for the kernel to go idle, then assert
- no cell raised (an ``error`` output),
- every ipywidgets control and every plotly figure the outputs asked for is in the DOM (counted in
  the kernel by walking each widget output's view tree, and on the page),
- every notebook has an enabled slider, and dragging one redraws a figure.
A screenshot of each notebook (at the slider it moved) is saved under
tests/browser/screenshots/.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from . import notebook_page as nbp

REPO = Path(__file__).resolve().parents[2]
NOTEBOOKS = sorted(p.name for p in (REPO / "notebooks").glob("*.ipynb"))
RUN_TIMEOUT = float(os.environ.get("MOR_LAB_BROWSER_TIMEOUT", 1500))


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_in_browser(name, lab, browser, shots, timings):
    start = time.monotonic()
    page = browser.new_page()
    console_errors: list[str] = []
    page.on("console", lambda m: console_errors.append(m.text) if m.type == "error" else None)
    try:
        nbp.open_notebook(page, lab.url(f"lab/workspaces/{name.replace('.', '-')}/tree/notebooks/{name}", reset=""))
        opened = time.monotonic()
        state = nbp.run_all(page, RUN_TIMEOUT)
        ran = time.monotonic()
        if state["errors"]:
            page.screenshot(path=str(shots / f"{name[:-6]}.png"))
            e = state["errors"][0]
            pytest.fail(f"{name}: code cell {e['cell']} raised {e['ename']}: {e['evalue']}\n{e['traceback'][-3000:]}")

        expected = nbp.expected_views(page, state)
        dom = nbp.wait_rendered(page, expected)
        assert not dom["widget_errors"], f"{name}: widget errors on the page: {dom['widget_errors']}"
        assert expected["missing"] == 0, f"{name}: {expected['missing']} widget outputs have no live model"
        for kind in ("controls", "sliders", "figures"):
            assert dom[kind] >= expected[kind], (
                f"{name}: {expected[kind]} {kind} expected from the outputs, {dom[kind]} rendered in the browser "
                f"(widgets asked for: {expected['names']}; console errors: {console_errors[-5:]})")

        sliders = [s for s in page.query_selector_all(".jp-OutputArea-output .widget-slider")
                   if not s.evaluate("el => !!el.querySelector('[disabled]') || el.classList.contains('mod-disabled')")]
        assert sliders, f"{name}: no enabled slider in the outputs (every notebook lets the reader move one)"
        index, moved = nbp.move_slider_until_figure_changes(page, sliders)
        page.evaluate("(el) => el.scrollIntoView({block: 'start'})", sliders[index])
        page.wait_for_timeout(500)
        page.screenshot(path=str(shots / f"{name[:-6]}.png"))
        timings[name] = {"open_s": round(opened - start, 1), "run_all_s": round(ran - opened, 1),
                         "total_s": round(time.monotonic() - start, 1), "figures": dom["figures"],
                         "controls": dom["controls"], "sliders": dom["sliders"], "moved_slider": moved}
    finally:
        nbp.shutdown_kernel(page)
        page.close()
