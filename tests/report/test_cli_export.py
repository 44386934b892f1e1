"""``torchvitals export tensorboard`` in a terminal of 80 and 200 columns: what it wrote,
per directory, and how to view it, within the width."""

from __future__ import annotations

import numpy as np
import pytest

from torchvitals.cli import main
from torchvitals.store.writer import RunWriter

pytest.importorskip("tensorboard", reason="the export writes with tensorboard")


@pytest.mark.parametrize("columns", [80, 200])
def test_export_says_what_it_wrote_within_the_width(tmp_path, capsys, monkeypatch, columns):
    monkeypatch.setenv("COLUMNS", str(columns))
    path = tmp_path / "run"
    rng = np.random.default_rng()
    steps = int(rng.integers(5, 30))
    with RunWriter(path, manifest={"world_size": 1}, on_full="block") as w:
        for step in range(steps):
            w.submit("scalars", {"step": step, "name": ["loss", "lr"], "value": rng.random(2)})
    logdir = tmp_path / "tb"
    assert main(["export", "tensorboard", str(path), str(logdir)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert max(len(line) for line in lines) <= columns
    squashed = "".join("".join(lines).split())  # a long path may wrap at 80 columns
    for said in (
        f"{logdir}: {2 * steps} scalar values, 0 histograms",
        f"view with: tensorboard --logdir {logdir}",
    ):
        assert "".join(said.split()) in squashed
