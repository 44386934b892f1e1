"""The HTML report's content without a browser: every layer present in the heatmaps
(grouped by module path when there are many), dead/saturation maps only where measured,
a histogram of every (layer, kind) recorded, signed histograms from ``neg_counts``, and
nothing the page could fetch."""

from __future__ import annotations

import base64
import re
import zlib
from dataclasses import dataclass, field
from html.parser import HTMLParser
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pytest
import report_runs

from torchvitals import load_run
from torchvitals.analysis.runtables import series_from_run
from torchvitals.analysis.summary import (
    histogram_matrix,
    histogram_series,
    layer_groups,
)
from torchvitals.engine.histogram import hist_edges
from torchvitals.report.html import FLAT_ROWS, _hist_figure, write_report
from torchvitals.report.raster import LEVELS

BINS = len(hist_edges().labels)


@pytest.fixture(scope="module")
def deep(tmp_path_factory):
    """The ~300-layer run and its report."""
    path = report_runs.deep_run(tmp_path_factory.mktemp("deep") / "run")
    run = load_run(path)
    return run, series_from_run(run), write_report(run, [], path / "report.html")


@dataclass
class Section:
    text: str = ""
    images: int = 0
    row_labels: list[list[str]] = field(default_factory=list)  # per labelled heatmap


class ReportParser(HTMLParser):
    """The report's sections by their <h2> title: their text, images and heatmap rows."""

    def __init__(self) -> None:
        super().__init__()
        self.sections: dict[str, Section] = {}
        self.current: Section | None = None
        self.in_h2 = False

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "h2":
            self.in_h2, self.current = True, Section()
        elif self.current is None:
            return
        elif tag == "img":
            self.current.images += 1
        elif tag == "div" and attrs.get("class") == "rows":
            self.current.row_labels.append([])
        elif tag == "div" and "title" in attrs:
            self.current.row_labels[-1].append(attrs["title"])

    def handle_endtag(self, tag):
        if tag == "h2":
            self.in_h2 = False

    def handle_data(self, data):
        if self.in_h2:
            self.sections[data] = self.current
        elif self.current is not None:
            self.current.text += data


def parse_report(text: str) -> ReportParser:
    parser = ReportParser()
    parser.feed(text)
    return parser


def png_indices(data_uri: str) -> np.ndarray:
    """The palette indices of a PNG written by torchvitals.report.raster.png."""
    raw = base64.b64decode(data_uri.split(",", 1)[1])
    width, height = np.frombuffer(raw[16:24], ">u4")
    idat = raw.index(b"IDAT")
    size = int(np.frombuffer(raw[idat - 4 : idat], ">u4")[0])
    rows = np.frombuffer(zlib.decompress(raw[idat + 4 : idat + 4 + size]), np.uint8)
    rows = rows.reshape(int(height), int(width) + 1)
    assert (rows[:, 0] == 0).all()  # filter type None on every row
    return rows[:, 1:]


def test_layer_groups_by_module_path():
    names = ["inp.weight", "blocks.0.fc.weight", "blocks.0.act", "blocks.12.attn.qkv.bias",
             "0.weight", "head", "head.bias"]  # fmt: skip
    assert layer_groups(names) == {
        "inp": ["inp.weight"],
        "blocks.0": ["blocks.0.fc.weight", "blocks.0.act"],
        "blocks.12": ["blocks.12.attn.qkv.bias"],
        "0": ["0.weight"],
        "head": ["head", "head.bias"],
    }


def test_every_layer_of_a_deep_model_is_in_the_heatmaps(deep):
    _, (_, _, _, series), out = deep
    page = parse_report(out.read_text())
    for metric, title in (("grad_norm", "Gradient norm per layer"),
                          ("weight_norm", "Weight norm per layer")):  # fmt: skip
        layers = [k.split("/", 1)[1] for k in series if k.startswith(metric + "/")]
        assert len(layers) > FLAT_ROWS
        section = page.sections[title]
        groups = layer_groups(layers)
        assert len(groups) < len(layers)  # so grouped: one row per block, then each block
        assert section.row_labels[0] == [f"{g} ({len(m)})" for g, m in groups.items()]
        assert section.row_labels[1:] == list(groups.values())
    # one layer per group: grouping would not help, every layer has its own row
    dead = [k.split("/", 1)[1] for k in series if k.startswith("dead_frac/")]
    assert len(layer_groups(dead)) == len(dead) > FLAT_ROWS
    assert page.sections["Dead-unit fraction per layer"].row_labels == [dead]


def test_heatmaps_leave_out_steps_without_values(deep):
    """Weights are recorded every 5 steps: their heatmap has a column per recorded step,
    none of them grey (no value) throughout."""
    _, _, out = deep
    text = out.read_text()
    for alt, columns in (("Weight norm per layer, by module group", 6),
                         ("Gradient norm per layer, by module group", 30)):  # fmt: skip
        uri = re.search(f"<img alt='{alt}' style='[^']*' src='([^']*)'", text).group(1)
        index = png_indices(uri)
        assert index.shape[1] == columns
        assert not (index == LEVELS + 1).all(axis=0).any()  # palette entry of NAN_RGB


def test_dead_and_saturation_maps_only_where_measured(deep):
    _, (_, _, _, series), out = deep
    page = parse_report(out.read_text())
    dead = [k.split("/", 1)[1] for k in series if k.startswith("dead_frac/")]
    assert dead and all(name.endswith(".act") for name in dead)  # the ReLUs only
    assert "not measured" in page.sections["Saturation fraction per layer"].text
    assert page.sections["Saturation fraction per layer"].images == 0
    assert "not measured" not in page.sections["Dead-unit fraction per layer"].text


def test_every_recorded_histogram_can_be_shown(deep):
    run, _, out = deep
    text = out.read_text()
    store = text[text.index("<template id='hist-store'>") :]
    shown = set(
        re.findall(r"<div class='hist[^']*' data-layer='([^']*)' data-kind='([^']*)'>", store)
    )
    hists = dict(histogram_series(run))
    assert shown == set(hists) and len(shown) > 300
    options = re.findall(r"<option value='([^']*)' data-kinds='([^']*)'>", text)
    assert {layer for layer, _ in options} == {layer for layer, _ in hists}
    for layer, kinds in options:
        assert set(kinds.split()) == {k for name, k in hists if name == layer}


def test_histogram_series_agrees_with_histogram_matrix(deep):
    run, _, _ = deep
    hists = dict(histogram_series(run))
    rng = np.random.default_rng()
    for i in rng.choice(len(hists), 12, replace=False):
        (layer, kind), h = list(hists.items())[i]
        steps, counts = histogram_matrix(run, layer, kind)
        np.testing.assert_array_equal(h.steps, steps)
        np.testing.assert_array_equal(h.counts, counts)
        # the Monitor records signs: some of every bin is negative, never more than all
        assert h.neg is not None and h.neg.shape == h.counts.shape
        assert (h.neg <= h.counts).all()


def signed_table(rng, steps: int = 6) -> pa.Table:
    """Synthetic hist rows with ``neg_counts``: layer ``pos`` has only positive elements,
    ``neg`` only negative ones, ``mixed`` both; ``old`` lacks neg_counts (null)."""
    rows = {"step": [], "rank": [], "layer": [], "kind": [], "counts": [], "neg_counts": []}
    for step in range(steps):
        for layer in ("pos", "neg", "mixed", "old"):
            counts = np.zeros(BINS, np.int64)
            bins = rng.choice(np.arange(20, 60), 5, replace=False)
            counts[bins] = rng.integers(1, 1000, 5)
            signs = {"pos": 0 * counts, "neg": counts, "mixed": rng.integers(0, counts + 1)}
            neg = signs.get(layer)
            values = (step, 0, layer, "grad", counts.tolist(), neg if neg is None else neg.tolist())
            for column, value in zip(rows, values, strict=True):
                rows[column].append(value)
    return pa.table(rows)


def test_signed_histograms_from_neg_counts():
    rng = np.random.default_rng()
    table = signed_table(rng)
    hists = dict(histogram_series(SimpleNamespace(hist=table)))
    assert hists[("old", "grad")].neg is None
    for layer in ("pos", "neg", "mixed"):
        h = hists[(layer, "grad")]
        counts = np.array(
            table.filter(pa.compute.equal(table["layer"], layer))["counts"].to_pylist()
        )
        neg = np.array(
            table.filter(pa.compute.equal(table["layer"], layer))["neg_counts"].to_pylist()
        )
        np.testing.assert_array_equal(h.counts, counts.T)
        np.testing.assert_array_equal(h.neg, neg.T)
        figure = _hist_figure(layer, "grad", h, height=100)
        assert "class='hist signed'" in figure
        index = png_indices(re.search(r"src='(data:image/png;base64,[^']*)'", figure).group(1))
        used = np.flatnonzero(counts.sum(axis=0))
        lo, hi = used.min(), used.max()
        n = hi - lo + 1
        assert index.shape == (2 * n, counts.shape[0])
        # top half: positive elements, the highest bin first; bottom half: negative ones mirrored
        pos_rows = (counts - neg).T[lo : hi + 1][::-1]
        neg_rows = neg.T[lo : hi + 1]
        np.testing.assert_array_equal(index[:n] > 0, pos_rows > 0)
        np.testing.assert_array_equal(index[n:] > 0, neg_rows > 0)
    assert "signed" not in _hist_figure("old", "grad", hists[("old", "grad")], height=100)


def test_the_page_fetches_nothing(deep):
    _, _, out = deep
    text = out.read_text()
    assert "default-src 'none'" in text  # the Content-Security-Policy forbids every fetch
    assert not re.search(r"(src|href)=['\"](?!data:)", text)
    assert "http://" not in text.replace("http://www.w3.org/2000/svg", "")
    assert "https://" not in text
