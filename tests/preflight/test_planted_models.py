"""Each check on a model with its fault planted, and the healthy model with none."""

from __future__ import annotations

import math

import planted
import pytest
import torch
from torch import nn

from torchvitals import preflight
from torchvitals.preflight.report import KINDS


def check(model, optimizer=None, **kwargs):
    return preflight(model, planted.batch(), nn.CrossEntropyLoss(), optimizer=optimizer, **kwargs)


def flagged(report, kind):
    """Findings of ``kind`` above info, by layer."""
    return {f.layer: f for f in report.of_kind(kind) if f.severity != "info"}


@pytest.fixture(scope="module")
def healthy():
    return check(planted.healthy())


def test_healthy_model_has_nothing_above_info(healthy):
    assert healthy.ok, str(healthy)
    assert {f.kind for f in healthy.findings} == set(KINDS)  # every check says what it saw
    (fit,) = healthy.of_kind("cannot_overfit")
    assert fit.evidence["reached_at"] < 200
    (initial,) = healthy.of_kind("initial_loss")
    assert initial.evidence["classes"] == planted.CLASSES
    assert 0.5 < initial.evidence["ratio"] < 1.5


def test_output_layer_scaled_x100_starts_far_above_ln_c():
    report = check(planted.hot_output(), steps=20, grad_check_samples=0, lr_probe_steps=0)
    (initial,) = report.of_kind("initial_loss")
    assert initial.severity == "critical" and initial.layer is None
    assert initial.evidence["ratio"] > 3
    assert math.isclose(initial.evidence["ln_c"], math.log(planted.CLASSES))
    assert "output layer" in initial.message


def test_detached_branch_gets_no_gradient():
    report = check(planted.DetachedBranch(), steps=20, grad_check_samples=0, lr_probe_steps=0)
    found = flagged(report, "no_gradient")
    assert list(found) == ["branch"]
    assert found["branch"].evidence["parameters"] == ["branch.weight", "branch.bias"]
    assert "detached branch" in found["branch"].message


def test_relu_biases_at_minus_10_are_dead_at_init():
    report = check(planted.dead_relu(), steps=30, grad_check_samples=0, lr_probe_steps=0)
    dead = flagged(report, "dead_at_init")
    assert set(dead) == {"1", "3"}
    assert all(f.severity == "critical" and f.evidence["dead_frac"] == 1.0 for f in dead.values())
    (fit,) = report.of_kind("cannot_overfit")  # and so the hidden layers never learn
    assert fit.severity == "critical"
    assert {"0", "2"} <= set(fit.evidence["zero_grad_layers"])


def test_tanh_with_huge_weights_saturates_at_init():
    report = check(planted.saturated_tanh(), steps=5, grad_check_samples=0, lr_probe_steps=0)
    saturated = flagged(report, "saturated_at_init")
    assert {"1", "3"} <= set(saturated)  # the Tanh modules, measured on their inputs
    for name in ("1", "3"):
        assert saturated[name].severity == "critical"
        assert saturated[name].evidence["sat_frac"] >= 0.6
        assert "Tanh inputs" in saturated[name].message


def test_wrong_backward_fails_the_gradient_check_upstream_only():
    report = check(planted.wrong_backward(), steps=5, lr_probe_steps=0)
    wrong = flagged(report, "gradient_check")
    assert set(wrong) == {"0", "2"}  # before the wrong square; "4" comes after it
    for finding in wrong.values():
        assert finding.severity == "critical"
        assert math.isclose(finding.evidence["error"], 0.5, rel_tol=1e-3)  # half the gradient
        assert "between 2 and 4" in finding.message


def test_adam_at_lr_10_cannot_overfit_and_sits_far_right():
    model = planted.healthy()
    report = check(model, torch.optim.Adam(model.parameters(), lr=10.0), steps=60)
    (fit,) = report.of_kind("cannot_overfit")
    assert fit.severity == "critical" and "Adam(lr=10)" in fit.message
    (lr,) = report.of_kind("lr_sanity")
    assert lr.severity == "critical"
    assert lr.evidence["user_lr"] == 10.0 and lr.evidence["decades_from_best"] >= 1
    assert "right" in lr.message
    too_large = flagged(report, "update_ratio")
    assert set(too_large) == {"0", "2", "4"}
    assert all(f.evidence["ratio"] > 10 for f in too_large.values())


def test_tiny_sgd_lr_moves_nothing_and_sits_far_left():
    model = planted.healthy()
    report = check(model, torch.optim.SGD(model.parameters(), lr=1e-7), steps=10)
    too_small = flagged(report, "update_ratio")
    assert set(too_small) == {"0", "2", "4"}
    assert all(f.evidence["ratio"] < 1e-5 for f in too_small.values())
    (lr,) = report.of_kind("lr_sanity")
    assert lr.severity == "warning" and "left" in lr.message


def test_parameters_frozen_by_the_param_groups_never_change():
    model = planted.healthy()
    optimizer = torch.optim.Adam(
        [
            {"params": model[0].parameters()},
            {"params": model[2].parameters(), "lr": 0.0},
        ],  # model[4] is in no group
        lr=1e-3,
    )
    report = check(model, optimizer, steps=10, grad_check_samples=0, lr_probe_steps=0)
    frozen = flagged(report, "no_gradient")
    assert set(frozen) == {"2", "4"}
    assert "lr=0" in frozen["2"].message
    assert "no param group" in frozen["4"].message
