"""``torchvitals compare`` on two real training runs that are the same until three quarters
of a ReLU layer's units are killed at a known step, at 80 and 200 columns."""

from __future__ import annotations

import re

import pytest
import training_runs as tr

from torchvitals.cli import main

AT = 150


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("cmp")
    tr.planted_dying_relu(base / "a", at=10**9)  # never: the same run without the kill
    tr.planted_dying_relu(base / "b", at=AT)
    return base / "a", base / "b"


@pytest.mark.parametrize("columns", [80, 200])
def test_compare_names_the_layer_and_step_readable_at_the_width(
    runs, tmp_path, capsys, monkeypatch, columns
):
    pytest.importorskip("matplotlib")
    monkeypatch.setenv("COLUMNS", str(columns))
    out = tmp_path / "compare.html"
    assert main(["compare", str(runs[0]), str(runs[1]), "--out", str(out)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert max(len(line) for line in lines) <= columns
    headers = [line for line in lines if line.startswith("┃")]
    for word in ("run", "steps", "layer", "score", "grad", "dead", "diverges", "kind", "what"):
        assert any(re.search(rf"\b{word}\b", h) for h in headers), word
    # The killed layer is the first row of the layer table, diverging at the kill.
    layer_rows = [line for line in lines if line.startswith("│") and "relu" in line]
    assert layer_rows and f"{AT} (dead)" in layer_rows[0]
    assert any("dead_units" in line and str(AT) in line for line in lines)
    tail = "".join(line.strip() for line in lines[-3:])  # a long path wraps at 80
    assert tail.endswith(f"comparison:{out}") or tail.endswith(f"comparison: {out}")
    page = out.read_text(encoding="utf-8")
    assert page.count("<img") == 4  # the loss and the three most different layers
    assert "dead of relu" in page and str(runs[1]) in page


def test_compare_needs_two_runs_and_says_so(runs, capsys):
    assert main(["compare", str(runs[0])]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["torchvitals compare: needs at least two run directories, got 1"]


def test_an_unknown_metric_names_the_run_and_what_it_logged(runs, tmp_path, capsys):
    args = ["compare", str(runs[0]), str(runs[1]), "--metric", "val/acc"]
    assert main([*args, "--out", str(tmp_path / "c.html")]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"torchvitals compare: {runs[0]}: ") and "'val/acc'" in line
    assert "loss" in line  # what it has
