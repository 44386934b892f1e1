"""The compare page in headless Chromium: no console error, nothing fetched, every plot
present and decoded, a hostile layer name shown as text and never run."""

from __future__ import annotations

import numpy as np
import pytest
from browser_harness import browser_or_skip

from torchvitals.analysis import Event
from torchvitals.analysis.compare import RunData, compare
from torchvitals.report.compare_page import PLOTTED_LAYERS, write_compare_page

HOSTILE = 'fc<img src=x onerror="window.pwned=1">'
STEPS = 300


def run_data(rng, name: str, jump: int | None) -> RunData:
    step = np.arange(STEPS)
    loss = (np.exp(-step / 100) + 0.1) * np.exp(rng.normal(0, 0.05, STEPS))
    series = {}
    for i, layer in enumerate(["stem", HOSTILE, "head", "tail"]):
        g = 10.0**-i * np.exp(rng.normal(0, 0.2, STEPS))
        if jump is not None and layer == HOSTILE:
            g[jump:] *= 30
            loss[jump:] *= 2
        series[f"grad_norm/{layer}"] = g
    events = [Event("spike", 50 + (jump or 0) // 10, 52, "warning", "a spike; details")]
    return RunData(name, step, loss, series, events)


def test_compare_page_in_a_browser(tmp_path):
    pytest.importorskip("matplotlib")
    rng = np.random.default_rng()
    runs = [run_data(rng, "a", None), run_data(rng, "b", 120), run_data(rng, "c", 200)]
    comparison = compare(runs)
    assert comparison.pairs[0].layers[0].layer == HOSTILE
    out = write_compare_page(comparison, runs, ["runs/a", "runs/b", "runs/c"], tmp_path / "c.html")
    with browser_or_skip() as browser:
        browser.open(out)
        assert browser.console_errors() == []
        assert browser.fetched() == []
        plots = 1 + PLOTTED_LAYERS * len(comparison.pairs)
        assert browser.count("img") == plots
        decoded = browser.js(
            "return Array.from(document.images).filter(i => i.complete && i.naturalWidth > 0)"
            ".length"
        )
        assert decoded == plots
        assert browser.js("return window.pwned === undefined")
        text = browser.js("return document.body.innerText")
        assert HOSTILE in text  # shown as written, as text
        assert browser.count("table") == 2 + 1 + len(comparison.pairs)  # runs, parts, events
        browser.screenshot(tmp_path / "compare.png")
