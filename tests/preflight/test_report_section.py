"""The pre-flight section of ``torchvitals report``, in the terminal and in the HTML page,
for a run that has a ``preflight.json``."""

from __future__ import annotations

import planted
import pytest
import torch
from torch import nn

from torchvitals import Monitor, preflight
from torchvitals.cli import main


def test_report_shows_the_runs_preflight(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    model = planted.healthy()
    opt = torch.optim.Adam(model.parameters(), lr=10.0)  # far right on the probe
    x, y = planted.batch()
    with Monitor(model, tmp_path / "run", optimizer=opt) as mon:
        preflight(model, (x, y), nn.CrossEntropyLoss(), optimizer=opt, monitor=mon, steps=10,
                  lr_probe_steps=2, grad_check_samples=0)  # fmt: skip
        for _ in range(30):
            loss = nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            mon.step(loss=loss)
    out = tmp_path / "report.html"
    assert main(["report", str(tmp_path / "run"), "--out", str(out)]) == 0
    terminal = capsys.readouterr().out
    assert "Pre-flight checks" in terminal and "lr_sanity" in terminal
    page = out.read_text(encoding="utf-8")
    assert "<h2>Pre-flight checks" in page and "far too large" in page
    assert "alt='LR probe'" in page
