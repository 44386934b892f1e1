"""Every command on a model with about 300 layers (the residual MLP of ``report_runs``):
report, report --watch on the closed run, compare and export tensorboard all finish, and
what they write covers every layer."""

from __future__ import annotations

import shutil

import pytest
from report_runs import DEPTH, deep_run

from torchvitals.cli import main
from torchvitals.store.reader import load_run


@pytest.fixture(scope="module")
def deep(tmp_path_factory):
    path = deep_run(tmp_path_factory.mktemp("deep") / "run", steps=12)
    twin = path.parent / "twin"
    shutil.copytree(path, twin)
    return path, twin


def test_report_watch_and_compare_cover_every_layer(deep, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    path, twin = deep
    layers = {str(x) for x in load_run(path).layers.column("layer").unique().to_pylist()}
    assert len(layers) > 3 * DEPTH
    out = tmp_path / "report.html"
    assert main(["report", str(path), "--out", str(out)]) == 0
    page = out.read_text()
    assert all(f"data-layer='{layer}'" in page for layer in layers if "act" in layer)
    watched = tmp_path / "watched.html"
    args = ["report", str(path), "--watch", "--interval", "0", "--out", str(watched)]
    assert main(args) == 0  # a closed run: one render, then it ends
    assert watched.read_text() == page.replace(str(out), str(watched))
    compared = tmp_path / "compare.html"
    assert main(["compare", str(path), str(twin), "--out", str(compared)]) == 0
    assert compared.stat().st_size > 0
    assert "Traceback" not in capsys.readouterr().err


def test_export_writes_a_histogram_series_per_layer(deep, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    path, _ = deep
    logdir = tmp_path / "tb"
    assert main(["export", "tensorboard", str(path), str(logdir)]) == 0
    events = EventAccumulator(str(logdir), size_guidance={"histograms": 0, "scalars": 0})
    events.Reload()
    hist = load_run(path).hist
    pairs = {
        f"{kind}_hist/{layer}"
        for layer, kind in zip(
            hist.column("layer").to_pylist(), hist.column("kind").to_pylist(), strict=True
        )
    }
    assert set(events.Tags()["histograms"]) == pairs and len(pairs) > 3 * DEPTH
