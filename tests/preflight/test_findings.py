"""The decisions of each check on given numbers, the report's forms (rows, JSON, text)
and its file in a run directory."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from torchvitals.collect.selection import spec_for
from torchvitals.preflight.activations import UnitStats, unit_findings
from torchvitals.preflight.initial_loss import initial_loss_finding, reference_classes
from torchvitals.preflight.lr_probe import lr_finding, probe_lrs
from torchvitals.preflight.report import Finding, PreflightReport
from torchvitals.preflight.single_batch import SingleBatchRun
from torchvitals.preflight.update_ratio import update_ratio_findings
from torchvitals.store.preflight_file import read_preflight, write_preflight

LN10 = math.log(10)


@pytest.mark.parametrize(
    ("loss", "severity", "says"),
    [
        (LN10 * 1.05, "info", "ratio"),
        (LN10 * 2.0, "warning", "outputs start too large"),
        (LN10 * 5.0, "critical", "outputs start too large"),
        (LN10 * 0.3, "warning", "label leak"),
        (LN10 * 0.01, "critical", "label leak"),
        (math.nan, "critical", "nan"),
    ],
)
def test_initial_loss_against_ln_c(loss, severity, says):
    finding = initial_loss_finding(loss, 10, "num_classes")
    assert finding.severity == severity and says in finding.message


def test_classes_come_from_the_dim_the_loss_reads():
    scores = torch.zeros(8, 7, 5)  # [N, C, L]: cross-entropy reads classes from dim 1
    assert reference_classes(nn.CrossEntropyLoss(), scores, None)[0] == 7
    assert reference_classes(F.cross_entropy, torch.zeros(8, 3), None)[0] == 3
    assert reference_classes(nn.NLLLoss(), torch.zeros(8, 4), None)[0] == 4
    assert reference_classes(nn.BCEWithLogitsLoss(), torch.zeros(8, 4), None)[0] == 2
    assert reference_classes(nn.MSELoss(), torch.zeros(8, 4), 6) == (6, "num_classes")
    classes, why = reference_classes(nn.MSELoss(), torch.zeros(8, 4), None)
    assert classes is None and "not a known classification loss" in why


def _curve(losses):
    return list(zip(probe_lrs((1e-5, 1.0)), losses, strict=True))


def test_probe_lrs_one_per_decade():
    assert probe_lrs((1e-5, 1.0)) == pytest.approx([1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0])


@pytest.mark.parametrize(
    ("user", "losses", "severity", "says"),
    [
        (1e-3, [2.3, 2.2, 1.5, 0.9, 1.2, math.inf], "info", "left"),
        (1e-2, [2.3, 2.2, 1.5, 0.9, 1.2, math.inf], "info", "the probe's best"),
        (1.0, [2.3, 2.2, 1.5, 0.9, 1.2, math.inf], "critical", "far too large"),
        (1e-1, [2.3, 2.2, 1.5, 0.5, 2.0, math.inf], "warning", "too large"),
        (1e-5, [2.3, 2.29, 2.2, 1.5, 0.9, 3.0], "warning", "too small"),
        (1e-3, [math.inf] * 6, "warning", "no LR"),
    ],
)
def test_where_the_users_lr_sits(user, losses, severity, says):
    finding = lr_finding(_curve(losses), 2.3, user, 5)
    assert finding.severity == severity and says in finding.message, finding.message


def _run(first_update_sq, init_sq):
    names = [f"l{i}.weight" for i in range(len(init_sq))]
    n = len(names)
    return SingleBatchRun(names, [2.0, 1.0], [True] * n, [True] * n, [False] * n, [True] * n,
                          first_update_sq, init_sq, "SGD(lr=0.1)")  # fmt: skip


def test_update_ratio_flags_both_ends_and_skips_zero_init():
    # ratios 1e-3 (usual), 3 (too large), 1e-6 (too small), 20 (critical); l4 starts at 0
    run = _run([1e-6, 9.0, 1e-12, 400.0, 1.0], [1.0, 1.0, 1.0, 1.0, 0.0])
    findings = update_ratio_findings(run)
    flagged = {f.layer: f.severity for f in findings if f.severity != "info"}
    assert flagged == {"l1": "warning", "l2": "warning", "l3": "critical"}
    (summary,) = [f for f in findings if f.layer is None]
    assert "starting at zero (no ratio): l4" in summary.message


def _units(name, module, numel, units, dead=0, saturated=0):
    return UnitStats(name, spec_for(name, module), numel, units, dead, saturated, 0, 0)


def test_unit_findings_thresholds_and_small_batches():
    rows = [
        _units("relu", nn.ReLU(), 64 * 100, 100, dead=30),  # 30%: warning
        _units("tiny", nn.ReLU(), 4 * 100, 100, dead=60),  # 4 values per unit: can't tell
        _units("tanh", nn.Tanh(), 6400, 100, saturated=4000),  # 62% of inputs: critical
    ]
    findings = {(f.kind, f.layer): f for f in unit_findings(rows)}
    assert findings["dead_at_init", "relu"].severity == "warning"
    assert findings["dead_at_init", "tiny"].severity == "info"
    assert "too few to tell" in findings["dead_at_init", "tiny"].message
    assert findings["saturated_at_init", "tanh"].severity == "critical"


def test_report_rows_worst_first_and_json_round_trip(tmp_path):
    report = PreflightReport(
        [
            Finding("initial_loss", "info", None, "fine", {"initial_loss": 2.3}),
            Finding("lr_sanity", "critical", None, "far right", {"losses": [1.0, math.inf]}),
            Finding("no_gradient", "warning", "fc", "no gradient", {"parameters": ["fc.weight"]}),
        ],
        {"total": 1.5},
        {"steps": 200},
    )
    assert not report.ok and report.worst == "critical"
    assert [r["kind"] for r in report.rows()] == ["lr_sanity", "no_gradient", "initial_loss"]
    assert "1 critical, 1 warning(s), 1 info" in report.title()
    assert "far right" in str(report)
    path = write_preflight(tmp_path, report.to_dict())
    stored = json.loads(path.read_text())
    assert stored["findings"][1]["evidence"]["losses"] == [1.0, None]  # JSON has no inf
    again = PreflightReport.load(tmp_path)
    assert again is not None and again.to_dict() == report.to_dict()


def test_bad_findings_and_files_are_named(tmp_path):
    with pytest.raises(ValueError, match="kind must be one of"):
        Finding("learning_rate", "info", None, "x")
    with pytest.raises(ValueError, match="severity must be one of"):
        Finding("lr_sanity", "fatal", None, "x")
    with pytest.raises(ValueError, match="not a pre-flight report"):
        PreflightReport.from_dict({"seconds": {}})
    assert read_preflight(tmp_path) is None
    path = tmp_path / "preflight.json"
    for text in ("[1, 2]", "{", "[" * 100_000):
        path.write_text(text)
        with pytest.raises(ValueError, match=r"preflight\.json: not a valid pre-flight report"):
            read_preflight(tmp_path)
    path.unlink()
    os.mkfifo(path)  # nothing writes to it: a blocking read would hang
    with pytest.raises(ValueError, match=r"preflight\.json: not a readable pre-flight report"):
        read_preflight(tmp_path)
