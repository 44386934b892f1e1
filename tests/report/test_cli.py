"""The ``torchvitals`` command line on small real training runs (``tests/training_runs.py``):
``events`` (JSON and plain text) and ``report`` (the HTML page)."""

from __future__ import annotations

import json

import pytest
import training_runs as tr

from torchvitals.cli import main


@pytest.fixture(scope="module")
def dead(tmp_path_factory):
    """Dead ReLU units under a hostile module name, and an initial loss far above ln(10)."""
    return tr.record(tmp_path_factory, tr.dead_units_hot_logits, "dead", num_classes=tr.CLASSES)


@pytest.fixture(scope="module")
def lr_step(tmp_path_factory):
    """An LR cut tenfold: one lr_drop, attributed to the LR."""
    return tr.record(tmp_path_factory, tr.lr_step, "lr_step")


def test_cli_events_json(dead, capsys):
    assert main(["events", str(dead.path), "--json", "--num-classes", str(tr.CLASSES)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert isinstance(out, list) and len(out) == len(dead.events)
    fields = {"kind", "step", "end_step", "severity", "cause", "evidence", "layers"}
    for item in out:
        assert fields <= item.keys(), item
        assert isinstance(item["layers"], list) and isinstance(item["evidence"], dict)
    assert [(e["kind"], e["step"]) for e in out] == [(e.kind, e.step) for e in dead.events]
    assert {"dead_units", "initial_loss"} <= {e["kind"] for e in out}
    assert any(e["kind"] == "dead_units" and e["layer"] == tr.HOSTILE for e in out)

    assert main(["events", str(dead.path)]) == 0  # plain text: one line per event
    text = capsys.readouterr().out
    assert "dead_units" in text and "initial_loss" not in text  # no --num-classes


def test_cli_events_json_with_attribution(lr_step, capsys):
    assert main(["events", str(lr_step.path), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    (drop,) = [e for e in out if e["kind"] == "lr_drop"]
    assert (
        drop["layers"] and {"layer", "metric", "change", "lead_steps"} <= drop["layers"][0].keys()
    )
    assert any(a["layer"] == "*" and a["metric"] == "lr" for a in drop["layers"])


def test_cli_report_html_escapes_layer_names(dead, tmp_path):
    pytest.importorskip("matplotlib")
    out = tmp_path / "report.html"
    args = ["report", str(dead.path), "--out", str(out), "--num-classes", str(tr.CLASSES)]
    assert main(args) == 0
    page = out.read_text(encoding="utf-8")
    assert page.count("<img") >= 2
    for kind in ("dead_units", "initial_loss"):
        assert kind in page
    assert tr.HOSTILE not in page  # the hostile module name is never live markup
    assert "relu&lt;script&gt;alert(1)&lt;/script&gt;" in page


def test_version(capsys):
    from torchvitals import __version__
    from torchvitals.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.strip() == f"torchvitals {__version__}"


def test_a_command_without_its_extra_says_which_in_one_line(dead, tmp_path, capsys, monkeypatch):
    import sys

    from torchvitals.cli import main

    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now fails
    assert main(["report", str(dead.path), "--out", str(tmp_path / "r.html")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "torchvitals report: needs matplotlib, which is not installed: "
        'pip install "torchvitals[report]"'
    ]


@pytest.mark.parametrize("columns", [80, 200])
def test_report_is_readable_at_the_terminal_width(dead, tmp_path, capsys, monkeypatch, columns):
    from torchvitals.cli import main

    pytest.importorskip("matplotlib")
    monkeypatch.setenv("COLUMNS", str(columns))
    args = ["report", str(dead.path), "--out", str(tmp_path / "r.html")]
    assert main([*args, "--num-classes", str(tr.CLASSES)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert max(len(line) for line in lines) <= columns
    headers = [line for line in lines if line.startswith("┃")]
    for word in ("severity", "kind", "steps", "what", "layer", "findings"):
        assert any(word in h for h in headers), word  # headers never break mid-word
    rows = [line for line in lines if "dead_units" in line]
    assert rows and len(lines) < 60  # one short line per event, not a folded paragraph

    assert main([*args, "--verbose"]) == 0
    verbose = capsys.readouterr().out
    event = next(e for e in dead.events if e.kind == "dead_units")
    assert " ".join(event.cause.split()) in " ".join(verbose.split())  # the full cause


def test_unknown_layer_names_are_refused_with_close_matches(dead, tmp_path, capsys):
    from torchvitals.cli import main

    pytest.importorskip("matplotlib")
    layer = next(e.layer for e in dead.events if e.kind == "dead_units")
    args = ["report", str(dead.path), "--out", str(tmp_path / "r.html")]
    assert main([*args, "--layers", layer, layer + "x"]) == 2
    err = capsys.readouterr().err
    assert f"no layer {layer + 'x'!r}" in err and "did you mean" in err and layer in err
    assert not (tmp_path / "r.html").exists()
