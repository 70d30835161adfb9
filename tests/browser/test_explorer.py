"""The depth explorer as a user meets it: ``mor-lab explore`` (Voila) in headless Chromium.

Type a prompt, switch plans, move the threshold: the depth-over-text figure, the batch utilization
timeline and the tokens/s summary must follow. Screenshot: tests/browser/screenshots/explorer.png.
"""
from __future__ import annotations

import time

from . import notebook_page as nbp
from .servers import voila

PROMPT = "Tell me about owls."

DEPTH_FIGURE = """() => {
  const plots = Array.from(document.querySelectorAll('.js-plotly-plot'));
  return plots.map(gd => ({title: gd.layout && gd.layout.title ? gd.layout.title.text : '',
                           names: gd.layout && gd.layout.yaxis ? gd.layout.yaxis.ticktext || [] : []}));
}"""


def _wait(page, predicate, what: str, timeout_s: float = 300):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(1)
    raise AssertionError(f"explorer: {what} within {timeout_s:.0f} s")


def _summary(page) -> str:
    return page.evaluate("() => Array.from(document.querySelectorAll('.widget-html')).map(e => e.innerText)"
                         ".join(' | ')")


def test_explorer_in_browser(lab_root, workdir, browser, shots, timings):
    start = time.monotonic()
    with voila(lab_root / "notebooks" / "depth_explorer.ipynb", workdir / "voila") as server:
        page = browser.new_page()
        try:
            page.goto(server.url(), wait_until="commit", timeout=600_000)  # offline: CDN fonts never load
            page.wait_for_selector(".widget-textarea textarea", timeout=600_000)
            _wait(page, lambda: len(page.query_selector_all(".js-plotly-plot")) >= 2 and "tokens/s" in _summary(page),
                  "two figures and a tokens/s summary did not render")
            loaded = time.monotonic()
            assert page.query_selector_all(".widget-dropdown select"), "no plan picker"
            assert page.query_selector_all(".widget-slider"), "no threshold/capacity slider"

            # 1. a new prompt: the depth figure shows it
            before = nbp.signature(page)
            box = page.locator(".widget-textarea textarea")
            box.fill(PROMPT)
            box.press("Tab")  # the text box commits on blur
            _wait(page, lambda: any(PROMPT[:10] in " ".join(f["names"]) for f in page.evaluate(DEPTH_FIGURE)),
                  f"the depth figure did not show the new prompt {PROMPT!r}")
            assert nbp.signature(page) != before
            assert "1 request" in _summary(page), _summary(page)

            # 2. another plan: the knob applies, the timeline changes
            before = nbp.signature(page)
            page.select_option(".widget-dropdown select", label="recursive + CDB")
            _wait(page, lambda: any(f["title"].startswith("recursive + CDB") for f in page.evaluate(DEPTH_FIGURE)),
                  "switching to recursive + CDB did not redraw the depth figure")
            assert nbp.signature(page) != before

            # 3. the slider: a figure updates
            slider = page.query_selector(".widget-slider")
            assert "disabled" not in (slider.get_attribute("class") or ""), "the knob is disabled for recursive + CDB"
            nbp.move_slider_until_figure_changes(page, [slider], timeout_s=300, root_selector="body")
            _wait(page, lambda: "running" not in _summary(page), "the run after the slider did not finish", 300)
            page.wait_for_timeout(1000)
            page.screenshot(path=str(shots / "explorer.png"), full_page=True)
            timings["explorer"] = {"load_s": round(loaded - start, 1), "total_s": round(time.monotonic() - start, 1)}
        except Exception:
            page.screenshot(path=str(shots / "explorer-failure.png"), full_page=True)
            print(f"voila log:\n{server.log_tail()}")
            raise
        finally:
            page.close()
