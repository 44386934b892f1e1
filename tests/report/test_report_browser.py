"""The HTML report opened in headless Chromium, as a person would: the demo (shortened)
and a ~300-layer model. No console error, nothing fetched, every plot drawn (each PNG
decoded, each chart with its lines), every layer in the heatmaps, the layer selector
showing the histogram picked, hover and zoom on the charts, event labels clear of the
plot and of each other. Skips, saying what is missing, without Chromium, its driver or
selenium (CI installs them: scripts/test.sh)."""

from __future__ import annotations

import numpy as np
import pytest
import report_runs
from browser_harness import browser_or_skip

from torchvitals import detect_events, load_run
from torchvitals.analysis import Event
from torchvitals.analysis.runtables import series_from_run
from torchvitals.analysis.summary import layer_groups
from torchvitals.report.html import FLAT_ROWS, HEATMAPS, NOT_MEASURED, write_report


def _report(path, with_events: bool):
    run = load_run(path)
    arrays = series_from_run(run)
    events = detect_events(run) if with_events else []
    return write_report(run, events, path / "report.html", arrays=arrays), arrays[3], events


@pytest.fixture(scope="module")
def reports(tmp_path_factory):
    """{name: (report path, series, events)} of the shortened demo and the deep model."""
    root = tmp_path_factory.mktemp("browser")
    return {
        "demo": _report(report_runs.demo_run(root / "demo"), with_events=True),
        "deep": _report(report_runs.deep_run(root / "deep"), with_events=False),
    }


@pytest.fixture(scope="module")
def browser():
    with browser_or_skip() as b:
        yield b


# Per <h2>: its figures, and for each figure an image decoded or a chart with lines drawn.
SECTIONS_JS = """
var out = {};
var h2 = document.querySelectorAll('h2');
for (var i = 0; i < h2.length; i++) {
  var figs = [], lines = [], el = h2[i].nextElementSibling;
  while (el && el.tagName !== 'H2') {
    var found = el.matches('figure.plot') ? [el] : Array.from(el.querySelectorAll('figure.plot'));
    found.forEach(function (f) {
      var img = f.querySelector('img'), svg = f.querySelector('svg');
      figs.push(img ? (img.complete && img.naturalWidth > 0 && img.naturalHeight > 0)
                    : Array.from(svg.querySelectorAll('path')).filter(function (p) {
                        return (p.getAttribute('d') || '').length > 10; }).length);
    });
    if (el.matches('p.none')) lines.push(el.textContent);
    el = el.nextElementSibling;
  }
  out[h2[i].textContent] = {figures: figs, lines: lines};
}
return out;
"""


def expected_heatmaps(series) -> dict[str, int]:
    """Heatmap figures per metric: one, or one per module group more when grouped; none
    when no layer has a value other than 0."""
    out = {}
    for metric in HEATMAPS:
        values = {k.split("/", 1)[1]: v[np.isfinite(v)] for k, v in series.items()
                  if k.startswith(metric + "/") and np.isfinite(v).any()}  # fmt: skip
        groups = layer_groups(list(values))
        grouped = len(values) > FLAT_ROWS and len(groups) < len(values)
        nonzero = any((v != 0).any() for v in values.values())
        out[metric] = (1 + len(groups) if grouped else 1) if nonzero else 0
    return out


@pytest.mark.parametrize("name", ["demo", "deep"])
def test_report_opens_with_every_plot_drawn(browser, reports, name):
    out, series, _ = reports[name]
    browser.open(out)
    assert browser.console_errors() == []
    assert browser.fetched() == []
    sections = browser.js(SECTIONS_JS)
    for metric, count in expected_heatmaps(series).items():
        title = HEATMAPS[metric][0]
        if count:
            figures = sections[title]["figures"]
            assert len(figures) == count and all(figures), title
        elif any(k.startswith(metric + "/") for k in series):  # measured, 0 throughout
            assert sections[title]["figures"] == []
            assert sections[title]["lines"][0].endswith("0 at every step.")
        elif metric in NOT_MEASURED:  # no plot, one line saying so
            assert sections[title] == {"figures": [], "lines": [NOT_MEASURED[metric]]}
        else:
            assert title not in sections
    # the loss chart: the loss, the LR where logged; the featured layers' norms: >= 1 line
    assert sections["Loss and learning rate"]["figures"][0] >= 1
    assert sections["Gradient norm of the featured layers"]["figures"][0] >= 1
    hist = sections["Histograms over steps"]["figures"]
    assert len(hist) >= 2 and all(hist)  # the grid and the layer shown by the selector
    assert browser.count("template#hist-store .hist") == 0  # template content is not in the DOM
    n_store = browser.js("return document.getElementById('hist-store').content.children.length")
    assert n_store == browser.js(
        "return Array.from(document.querySelectorAll('#hist-layer option'))"
        ".reduce(function (n, o) { return n + o.dataset.kinds.split(' ').length; }, 0)"
    )


def test_every_layer_of_the_deep_model_is_listed(browser, reports):
    out, series, _ = reports["deep"]
    browser.open(out)
    layers = [k.split("/", 1)[1] for k in series if k.startswith("grad_norm/")]
    labels = browser.js(
        "var h = Array.from(document.querySelectorAll('h2')).find(function (e) {"
        "  return e.textContent === 'Gradient norm per layer'; });"
        "var out = [], el = h.nextElementSibling;"
        "while (el && el.tagName !== 'H2') {"
        "  el.querySelectorAll('.groups .rows div').forEach(function (d) {"
        "    out.push(d.title); });"
        "  el = el.nextElementSibling; }"
        "return out;"
    )
    assert len(layers) > 150 and labels == layers


@pytest.mark.parametrize("name", ["demo", "deep"])
def test_the_layer_selector_shows_the_histogram_picked(browser, reports, name):
    out, _, _ = reports[name]
    browser.open(out)
    options = browser.js(
        "return Array.from(document.querySelectorAll('#hist-layer option'))"
        ".map(function (o) { return [o.value, o.dataset.kinds]; })"
    )
    rng = np.random.default_rng()
    for i in rng.choice(len(options), 4, replace=False):
        layer, kinds = options[i]
        kind = str(rng.choice(kinds.split()))
        browser.select("#hist-layer", layer)
        browser.select("#hist-kind", kind)
        shown = browser.js(
            "var h = document.querySelectorAll('#hist-view .hist');"
            "if (h.length !== 1) return null; var img = h[0].querySelector('img');"
            "return [h[0].dataset.layer, h[0].dataset.kind, img.naturalWidth > 0,"
            "        img.getBoundingClientRect().height];"
        )
        assert shown is not None and shown[:3] == [layer, kind, True] and shown[3] > 100
        disabled = browser.js(
            "return Array.from(document.querySelectorAll('#hist-kind option'))"
            ".filter(function (o) { return o.disabled; }).map(function (o) { return o.value; })"
        )
        all_kinds = browser.js(
            "return Array.from(document.querySelectorAll('#hist-kind option'))"
            ".map(function (o) { return o.value; })"
        )
        assert set(disabled) == set(all_kinds) - set(kinds.split())
    assert browser.console_errors() == []


def test_hover_and_zoom_on_the_loss_chart(browser, reports):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    out, _, _ = reports["demo"]
    browser.open(out)
    chart = browser.driver.find_elements(By.CSS_SELECTOR, "figure.chart")[0]
    overlay = chart.find_element(By.CSS_SELECTOR, "rect.overlay")
    full = chart.get_attribute("data-domain")
    width = overlay.rect["width"]
    ActionChains(browser.driver).move_to_element_with_offset(overlay, 0, 0).perform()
    tip = browser.js(
        "var g = arguments[0].querySelector('g[visibility=visible]');"
        "return g ? Array.from(g.querySelectorAll('text')).map(function (t) {"
        "  return t.textContent; }) : null;",
        chart,
    )
    assert tip and tip[0].startswith("step ") and any(t.startswith("loss: ") for t in tip)
    # drag across the middle fifth: the chart zooms on those steps; a double click undoes it
    actions = ActionChains(browser.driver)
    actions.move_to_element_with_offset(overlay, int(-0.1 * width), 0).click_and_hold()
    actions.move_by_offset(int(0.2 * width), 0).release().perform()
    lo, hi = map(float, chart.get_attribute("data-domain").split())
    f_lo, f_hi = map(float, full.split())
    assert f_lo < lo < hi < f_hi and (hi - lo) / (f_hi - f_lo) == pytest.approx(0.2, abs=0.03)
    overlay = chart.find_element(By.CSS_SELECTOR, "rect.overlay")  # the chart was redrawn
    ActionChains(browser.driver).double_click(overlay).perform()
    assert chart.get_attribute("data-domain") == full
    assert browser.console_errors() == []


def test_event_labels_clear_of_the_plot_and_of_each_other(browser, reports, tmp_path):
    """Events at nearby steps (as a run with a plateau ending in a kick-in, a spike and an
    LR drop has): their labels are staggered in the band above the plot."""
    out, _, _ = reports["demo"]
    run = load_run(out.parent)
    rng = np.random.default_rng()
    kinds = ["plateau", "kick_in", "spike", "lr_drop", "divergence", "nonfinite", "spike"]
    steps = np.sort(rng.integers(100, 140, len(kinds)))
    events = [Event(k, int(s), int(s) + 5) for k, s in zip(kinds, steps, strict=True)]
    browser.open(write_report(run, events, tmp_path / "report.html"))
    boxes, top = browser.js(
        "var svg = document.querySelector('figure.chart svg');"
        "var r = svg.querySelector('rect.overlay').getBBox();"
        "return [Array.from(svg.querySelectorAll('g.event text')).map(function (t) {"
        "  var b = t.getBBox(); return [b.x, b.y, b.x + b.width, b.y + b.height]; }), r.y];"
    )
    assert len(boxes) == len(kinds)
    for i, a in enumerate(boxes):
        assert a[3] <= top  # in the band above the plot, clear of the loss and LR lines
        for b in boxes[i + 1 :]:
            assert a[2] <= b[0] or b[2] <= a[0] or a[3] <= b[1] or b[3] <= a[1], (a, b)
    assert browser.console_errors() == []
