"""The tables both reports show (``torchvitals.analysis.summary``), on synthetic series and
events and on tiny runs written by ``RunWriter`` and by the ``Monitor``."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from torchvitals import Event, Monitor, RunWriter, hist_edges, load_run
from torchvitals.analysis.summary import (
    EVENT_COLUMNS,
    WORST_COLUMNS,
    attribution_text,
    event_rows,
    histogram_layers,
    histogram_matrix,
    worst_layers,
)

NAN = float("nan")
BINS = len(hist_edges().labels)


# ------------------------------------------------------------------------ worst layers
def synthetic_series() -> dict[str, np.ndarray]:
    return {
        "grad_norm": np.array([1.0, 50.0, 1.0, 1.0]),  # global: no layer, never ranked
        "dead_frac/relu": np.array([0.1, 0.5, NAN, 0.9]),
        "sat_frac/relu": np.array([0.0, 0.1, 0.2, 0.0]),
        "grad_norm/fc": np.array([1e-2, 1.0, NAN, 1e2]),  # 4 decades: 0.2 * 4 = 0.8
        "nonfinite/head": np.array([0.0, 2.0, 0.0, 3.0]),
        "grad_norm/head": np.array([1.0, NAN, NAN, NAN]),  # one point: no range
        "dead_frac/calm": np.array([0.0, 0.0, 0.01, 0.0]),
        "dead_frac/empty": np.array([NAN, NAN, NAN, NAN]),  # never measured: no row
    }


def test_worst_layers_ranks_by_score():
    rows = worst_layers(synthetic_series())
    assert [r["layer"] for r in rows] == ["head", "relu", "fc", "calm"]
    head, relu, fc, calm = rows
    assert head == {
        "layer": "head",
        "severity": "critical",
        "findings": "nonfinite",
        "score": 10.0,
        "nonfinite": 5.0,
        "grad_norm_last": 1.0,
    }
    assert relu == {
        "layer": "relu",
        "severity": "critical",
        "findings": "dead_units",
        "score": 1.1,
        "max_dead_frac": 0.9,
        "max_sat_frac": 0.2,
    }
    assert fc == {"layer": "fc", "score": 0.8, "grad_norm_last": 100.0, "grad_norm_range": 4.0}
    assert calm == {"layer": "calm", "score": 0.01, "max_dead_frac": 0.01}
    for row in rows:
        assert set(row) <= set(WORST_COLUMNS)


def test_worst_layers_put_warnings_before_a_large_gradient_range():
    n = 200
    t = np.arange(n)
    series = {
        # 30% saturated tanh units: a warning finding
        "sat_frac/tanh": np.where(t < 50, 0.0, 0.3),
        # six decades of gradient-norm range, no finding of its own
        "grad_norm/fc.weight": np.logspace(-3, 3, n),
    }
    rows = worst_layers(series)
    assert rows[0]["layer"] == "tanh" and rows[0]["severity"] == "warning"
    assert rows[0]["findings"] == "saturation"
    assert rows[1]["layer"] == "fc.weight" and rows[1]["score"] > rows[0]["score"]


def test_worst_layers_limit_and_rounding():
    series = {f"dead_frac/l{i}": np.array([i / 30 + 1e-6]) for i in range(12)}
    rows = worst_layers(series)
    assert len(rows) == 10  # the default limit
    assert [r["layer"] for r in rows] == [f"l{i}" for i in range(11, 1, -1)]
    assert rows[0]["score"] == round(11 / 30 + 1e-6, 3)
    assert rows[0]["max_dead_frac"] == round(11 / 30 + 1e-6, 4)
    assert [r["layer"] for r in worst_layers(series, limit=2)] == ["l11", "l10"]
    assert worst_layers({}) == [] and worst_layers({"grad_norm": np.ones(3)}) == []


# -------------------------------------------------------------------------- event rows
def test_event_rows_fields():
    curve = Event(
        "spike", 10, 14, "warning", "loss x9",
        layers=[
            ("*", "lr", math.log(4.0), 2),
            ("fc", "dead_frac", 0.3, 0),
            ("fc", "grad_norm", math.log(0.5), -1),
            ("head", "weight_norm", 1.0, 5),  # beyond the first 3: not shown
        ],
    )  # fmt: skip
    finding = Event("dead_units", 0, 99, "critical", "48 of 64 units dead", layer="relu<x>")
    rows = event_rows([curve, finding])
    assert [list(r) for r in rows] == [EVENT_COLUMNS, EVENT_COLUMNS]
    assert rows[0] == {
        "kind": "spike",
        "step": 10,
        "end_step": 14,
        "severity": "warning",
        "layer": "",  # a curve event has no layer
        "cause": "loss x9",
        "attribution": "* lr x4 (lead 2); fc dead_frac +0.30 (lead 0); fc grad_norm x0.5 (lead -1)",
    }
    assert rows[1]["layer"] == "relu<x>"  # escaping is the renderer's job
    assert rows[1]["attribution"] == ""
    assert event_rows([]) == []


def test_attribution_text_top():
    ev = Event("lr_drop", 5, 9, layers=[("*", "lr", math.log(0.1), 3), ("a", "sat_frac", -0.25, 1)])
    assert attribution_text(ev) == "* lr x0.1 (lead 3); a sat_frac -0.25 (lead 1)"
    assert attribution_text(ev, top=1) == "* lr x0.1 (lead 3)"


def test_histogram_layers_by_gradient_norm_span():
    series = synthetic_series()
    series["grad_norm/small"] = np.array([1.0, 2.0, NAN, 0.0])  # zeros are left out
    series["grad_norm/neg"] = np.array([NAN, 0.0, 0.0, 3.0])  # one positive point: no span
    assert histogram_layers(None, series) == ["fc", "small"]
    assert histogram_layers(None, series, count=1) == ["fc"]


# -------------------------------------------------------------------- histogram matrix
def hist_rows(rank: int, steps: list[int]) -> dict[str, object]:
    """Three rows per step: (fc, grad), (fc, act), (head, grad), counts unique per row."""
    n = len(steps)
    counts = np.zeros((3 * n, BINS), dtype=np.int64)
    for i, step in enumerate(steps):
        for j in range(3):
            counts[3 * i + j, 2 + j] = 100 * rank + 10 * step + j + 1
    return {
        "step": np.repeat(steps, 3),
        "layer": ["fc", "fc", "head"] * n,
        "kind": ["grad", "act", "grad"] * n,
        "counts": counts,
    }


def test_histogram_matrix_from_written_run(tmp_path):
    path = tmp_path / "run"
    for rank in (1, 0):
        with RunWriter(path, manifest={"world_size": 2}, rank=rank, on_full="block") as w:
            w.submit("hist", hist_rows(rank, [0, 1, 2]))
            w.submit("hist", hist_rows(rank, [3]))
    run = load_run(path)

    steps, counts = histogram_matrix(run, "fc", "grad")
    np.testing.assert_array_equal(steps, [0, 1, 2, 3])
    assert counts.shape == (BINS, 4) and counts.dtype == np.float64
    # rank 0 only (the lowest present), bin 2 of the (fc, grad) rows
    np.testing.assert_array_equal(counts[2], [1, 11, 21, 31])
    assert counts.sum() == counts[2].sum()

    _, act = histogram_matrix(run, "fc", "act")
    np.testing.assert_array_equal(act[3], [2, 12, 22, 32])
    _, head = histogram_matrix(run, "head", "grad")
    np.testing.assert_array_equal(head[4], [3, 13, 23, 33])
    assert histogram_matrix(run, "head", "act") is None
    assert histogram_matrix(run, "nope", "grad") is None


@pytest.fixture(scope="module")
def monitored(tmp_path_factory):
    """Five steps of a tiny MLP with the Monitor attached, read back."""
    path = tmp_path_factory.mktemp("monitored") / "run"
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with Monitor(model, path, optimizer=opt, on_full="block") as mon:
        for _ in range(5):
            loss = model(torch.randn(8, 4)).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            mon.step(loss=loss)
    return load_run(path)


def test_histogram_matrix_of_a_monitored_run(monitored):
    steps, counts = histogram_matrix(monitored, "0.weight", "grad")
    np.testing.assert_array_equal(steps, np.arange(5))
    assert counts.shape == (BINS, 5) and counts.dtype == np.float64
    # every element of the 3x4 weight gradient is in exactly one bin, at every step
    np.testing.assert_array_equal(counts.sum(axis=0), np.full(5, 12.0))
    _, act = histogram_matrix(monitored, "0", "act")  # the first Linear's output, 8 x 3
    np.testing.assert_array_equal(act.sum(axis=0), np.full(5, 24.0))
    assert histogram_matrix(monitored, "0.weight", "nope") is None
    assert histogram_matrix(monitored, "nope", "grad") is None


def test_histogram_matrix_matches_the_layers_table(monitored):
    """Each histogram column counts the ``numel`` of its row in the ``layers`` table."""
    numel: dict[tuple[str, str], dict[int, int]] = {}
    for r in monitored.layers.to_pylist():
        numel.setdefault((r["layer"], r["kind"]), {})[r["step"]] = r["numel"]
    assert len(numel) >= 10
    for (layer, kind), expected in numel.items():
        steps, counts = histogram_matrix(monitored, layer, kind)
        assert dict(zip(steps.tolist(), counts.sum(axis=0).tolist(), strict=True)) == expected
