"""Drive one notebook in JupyterLab through Playwright: run all, wait, inspect what rendered, move a slider.

Everything is read from the page the user would see (``window.jupyterapp`` is exposed by the test
server) and, for what the notebook *asked* to show, from the kernel: the widget views of every
output are walked there (boxes' children included) and counted by kind.
"""
from __future__ import annotations

import json
import time

NOTEBOOK = "window.jupyterapp.shell.currentWidget"

KERNEL_CONNECTED = f"""() => {{
  if (!window.jupyterapp || !window.jupyterapp.shell) return false;
  const nb = {NOTEBOOK};
  const k = nb && nb.sessionContext && nb.sessionContext.session && nb.sessionContext.session.kernel;
  return !!(k && k.connectionStatus === 'connected' && k.status === 'idle' && nb.content.widgets.length);
}}"""

STATE = f"""() => {{
  const nb = {NOTEBOOK};
  const kernel = nb.sessionContext.session && nb.sessionContext.session.kernel;
  const cells = nb.content.widgets.filter(c => c.model.type === 'code');
  const busy = Array.from(nb.node.querySelectorAll('.jp-InputPrompt')).some(p => p.textContent.includes('*'));
  const errors = [], outputs = [];
  cells.forEach((c, i) => c.model.outputs.toJSON().forEach(o => {{
    if (o.output_type === 'error') errors.push({{cell: i, ename: o.ename, evalue: o.evalue,
                                                 traceback: (o.traceback || []).join('\\n')}});
    if (o.data) outputs.push({{cell: i, mimes: Object.keys(o.data),
                               model_id: (o.data['application/vnd.jupyter.widget-view+json'] || {{}}).model_id}});
  }}));
  const pending = cells.filter(c => c.model.sharedModel.getSource().trim() && c.model.executionCount === null).length;
  return {{status: kernel ? kernel.status : 'none', busy, pending, errors, outputs, cells: cells.length}};
}}"""

# Runs in the kernel: what the widget outputs contain (controls, plotly FigureWidgets), boxes walked.
WALK = """
def _mor_lab_walk(ids):
    import json
    from ipywidgets import DOMWidget
    from ipywidgets.widgets.widget import _instances
    try:
        from plotly.basewidget import BaseFigureWidget
    except ImportError:
        BaseFigureWidget = ()
    counts = {"controls": 0, "sliders": 0, "figures": 0, "missing": 0, "names": []}
    def walk(w):
        if isinstance(w, BaseFigureWidget):
            counts["figures"] += 1
        elif isinstance(w, DOMWidget) and w._view_module == "@jupyter-widgets/controls":
            counts["controls"] += 1
            counts["names"].append(w._view_name)
            counts["sliders"] += "Slider" in w._view_name
        for child in getattr(w, "children", ()) or ():
            walk(child)
    for i in ids:
        w = _instances.get(i)
        if w is None:
            counts["missing"] += 1
        else:
            walk(w)
    print("MOR_LAB_WALK" + json.dumps(counts))
_mor_lab_walk(%s)
del _mor_lab_walk
"""

KERNEL_EXEC = f"""async (code) => {{
  const kernel = {NOTEBOOK}.sessionContext.session.kernel;
  const future = kernel.requestExecute({{code, silent: false, store_history: false}});
  let text = '';
  future.onIOPub = msg => {{ if (msg.header.msg_type === 'stream') text += msg.content.text;
                            if (msg.header.msg_type === 'error') text += 'ERROR ' + msg.content.evalue; }};
  await future.done;
  return text;
}}"""

DOM_COUNTS = f"""() => {{
  const nb = {NOTEBOOK}.node;
  const outputs = Array.from(nb.querySelectorAll('.jp-OutputArea-output'));
  return {{
    // a control's root view: an lm-Widget with a widget-* class (ipywidgets 8's slider views lack jupyter-widgets)
    controls: Array.from(nb.querySelectorAll('.jp-OutputArea-output .lm-Widget'))
                   .filter(e => Array.from(e.classList).some(c => c === 'jupyter-widgets' || c.startsWith('widget-'))).length,
    sliders: nb.querySelectorAll('.jp-OutputArea-output .widget-slider').length,
    figures: nb.querySelectorAll('.jp-OutputArea-output.js-plotly-plot, .jp-OutputArea-output .js-plotly-plot').length,
    widget_errors: outputs.filter(o => /Error displaying widget|Failed to load model|model not found/i.test(o.textContent))
                          .map(o => o.textContent.slice(0, 300)),
  }};
}}"""

# A fingerprint of every rendered plotly figure: changes when any figure is redrawn with other data.
FIGURE_SIGNATURE = """(root) => {
  const r = root || document;
  let h = 0, n = 0;
  const add = (str) => { for (let i = 0; i < str.length; i++) { h = (h * 31 + str.charCodeAt(i)) | 0; } n += str.length; };
  r.querySelectorAll('.js-plotly-plot').forEach(gd => {
    const l = gd.layout || {};
    add(JSON.stringify([l.title ? l.title.text : '', l.shapes, l.annotations]));  // e.g. a moved threshold line
    (gd.data || []).forEach(t => add(JSON.stringify([t.x, t.y, t.z, t.text, t.base, t.visible,
                                                   t.marker && t.marker.color, t.textfont && t.textfont.color])));
  });
  return n + '/' + h;
}"""


def open_notebook(page, url: str, timeout_s: float = 120) -> None:
    page.goto(url)
    page.wait_for_function(KERNEL_CONNECTED, timeout=timeout_s * 1000, polling=500)
    page.evaluate("window.jupyterapp.shell.collapseLeft()")  # the notebook gets the whole width


def run_all(page, timeout_s: float) -> dict:
    """Run all cells; wait until the kernel is idle and no cell is queued (or one failed)."""
    page.evaluate("window.jupyterapp.commands.execute('notebook:run-all-cells')")
    deadline, quiet = time.monotonic() + timeout_s, 0
    time.sleep(2)
    while time.monotonic() < deadline:
        state = page.evaluate(STATE)
        done = state["status"] == "idle" and not state["busy"] and (state["pending"] == 0 or state["errors"])
        quiet = quiet + 1 if done else 0
        if quiet >= 3:
            return state
        time.sleep(1.5)
    state = page.evaluate(STATE)
    raise TimeoutError(f"notebook still running after {timeout_s:.0f} s: kernel {state['status']}, "
                       f"{state['pending']} code cells not run yet")


def expected_views(page, state: dict) -> dict:
    """What the outputs should show: widget controls and figures (from the kernel), static figures."""
    ids = [o["model_id"] for o in state["outputs"] if o["model_id"]]
    text = page.evaluate(KERNEL_EXEC, WALK % json.dumps(ids))
    marker = next((line for line in text.splitlines() if line.startswith("MOR_LAB_WALK")), None)
    if marker is None:
        raise AssertionError(f"could not walk the notebook's widgets in the kernel: {text[-2000:]}")
    counts = json.loads(marker[len("MOR_LAB_WALK"):])
    static = sum(1 for o in state["outputs"] if not o["model_id"] and "application/vnd.plotly.v1+json" in o["mimes"])
    counts["figures"] += static
    counts["widget_outputs"] = len(ids)
    return counts


def wait_rendered(page, expected: dict, timeout_s: float = 90) -> dict:
    deadline = time.monotonic() + timeout_s
    while True:
        dom = page.evaluate(DOM_COUNTS)
        ok = all(dom[k] >= expected[k] for k in ("controls", "sliders", "figures"))
        if ok or time.monotonic() > deadline:
            return dom
        time.sleep(1)


def signature(page, root_selector: str | None = None) -> str:
    root = page.query_selector(root_selector) if root_selector else None
    return page.evaluate(FIGURE_SIGNATURE, root)


def drag_slider(page, slider, fraction: float) -> None:
    """Drag a noUiSlider handle to ``fraction`` of the track, as a mouse would."""
    track = slider.query_selector(".noUi-target") or slider
    handle = slider.query_selector(".noUi-handle")
    slider.scroll_into_view_if_needed()
    box, deadline = None, time.monotonic() + 10
    while time.monotonic() < deadline:  # the notebook panel may still be scrolling: wait until it settles
        time.sleep(0.3)
        now = handle.bounding_box()
        if now == box:
            break
        box = now
    t, h = track.bounding_box(), handle.bounding_box()
    page.mouse.move(h["x"] + h["width"] / 2, h["y"] + h["height"] / 2)
    page.mouse.down()
    target = t["x"] + fraction * t["width"]
    for k in range(1, 6):
        page.mouse.move(h["x"] + h["width"] / 2 + (target - h["x"] - h["width"] / 2) * k / 5, h["y"] + h["height"] / 2)
        time.sleep(0.05)
    page.mouse.up()


def slider_position(slider) -> float:
    """Where the handle sits along its track, 0..1 (to move it somewhere else)."""
    t = (slider.query_selector(".noUi-target") or slider).bounding_box()
    h = slider.query_selector(".noUi-handle").bounding_box()
    return (h["x"] + h["width"] / 2 - t["x"]) / max(t["width"], 1)


def move_slider_until_figure_changes(page, sliders, timeout_s: float = 120, root_selector: str | None = None):
    """Try sliders in order; return (index, description) of the first whose move redraws a figure."""
    tried = []
    for i, slider in enumerate(sliders):
        label = (slider.inner_text() or "").strip().replace("\n", " ")[:60]
        before = signature(page, root_selector)
        pos = slider_position(slider)
        drag_slider(page, slider, 0.1 if pos > 0.5 else 0.9)  # near an end: a few-option slider snaps back from 1/4
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            time.sleep(1)
            if signature(page, root_selector) != before:
                return i, label
            if root_selector is None and time.monotonic() > deadline - timeout_s + 15 and \
                    page.evaluate(f"() => {NOTEBOOK}.sessionContext.session.kernel.status") == "idle":
                break  # the kernel finished handling the move and nothing was redrawn
        tried.append(label)
    raise AssertionError(f"moving a slider changed no figure (tried {len(tried)}: {tried})")


def shutdown_kernel(page) -> None:
    """Stop the notebook's kernel (an idle SmolLM2 kernel holds ~1 GB; the next notebook needs the cores)."""
    try:
        page.evaluate(f"async () => {{ const nb = {NOTEBOOK}; if (nb && nb.sessionContext) await nb.sessionContext.shutdown(); }}")
    except Exception:  # the page may already be gone; the server's exit stops the kernel anyway
        pass
