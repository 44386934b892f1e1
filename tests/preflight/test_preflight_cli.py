"""``torchvitals preflight module:function``: file and module targets, the JSON and the
table, and bad targets named."""

from __future__ import annotations

import json
import sys
import textwrap

import pytest

from torchvitals.cli import main

TARGET = textwrap.dedent(
    """
    import torch
    from torch import nn

    def setup():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
        x = torch.randn(32, 8)
        return model, (x, x[:, :3].argmax(1)), nn.CrossEntropyLoss()

    def as_dict():
        model, batch, loss_fn = setup()
        return {"model": model, "batch": batch, "loss_fn": loss_fn, "num_classes": 3,
                "optimizer": torch.optim.SGD(model.parameters(), lr=1e-7)}

    def not_a_setup():
        return 42
    """
)
FAST = ["--steps", "10", "--lr-probe-steps", "2", "--grad-check-samples", "2"]


@pytest.fixture
def target(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "path", list(sys.path))  # the command adds the file's folder
    path = tmp_path / "pf_target.py"
    path.write_text(TARGET)
    yield path
    sys.modules.pop("pf_target", None)


def test_preflight_command_on_a_file_target(target, capsys):
    assert main(["preflight", f"{target}:setup", "--json", *FAST]) == 0
    report = json.loads(capsys.readouterr().out)
    kinds = {f["kind"] for f in report["findings"]}
    assert {"initial_loss", "cannot_overfit", "gradient_check", "lr_sanity"} <= kinds
    assert report["settings"]["steps"] == 10 and report["settings"]["optimizer"] == "Adam(lr=0.001)"


def test_preflight_command_on_a_module_target_prints_a_table(target, capsys, monkeypatch):
    monkeypatch.syspath_prepend(str(target.parent))
    assert main(["preflight", "pf_target:as_dict", *FAST]) == 0
    out = capsys.readouterr().out
    assert "Pre-flight checks" in out and "update_ratio" in out and "SGD(lr=1e-07)" in out


@pytest.mark.parametrize(
    ("name", "says"),
    [
        ("{path}:not_a_setup", "returned int; expected (model, batch, loss_fn)"),
        ("{path}:missing", "has no function 'missing'"),
        ("{path}", "target must be module:function"),
        ("no_such_module_xyz:setup", "cannot import module 'no_such_module_xyz'"),
        ("{folder}/absent.py:setup", "no such file"),
    ],
)
def test_preflight_command_names_a_bad_target(target, capsys, name, says):
    spec = name.format(path=target, folder=target.parent)
    assert main(["preflight", spec]) == 2
    assert says in capsys.readouterr().err
