"""What preflight promises its caller: the model, the optimizer and the RNGs are left as
they were, a Monitor records nothing of it, bad arguments are named, and the other shapes
of training step (``step_fn``, a dict batch, losses without classes) work."""

from __future__ import annotations

import random

import numpy as np
import planted
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from torchvitals import Monitor, PreflightReport, load_run, preflight

FAST = {"steps": 10, "lr_probe_steps": 2, "grad_check_samples": 2}


def test_model_optimizer_and_rng_are_untouched():
    model = planted.healthy().eval()
    model[4].weight.requires_grad_(False)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x, y = planted.batch()
    F.cross_entropy(model(x), y).backward()
    opt.step()  # momentum buffers now exist
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    state = {k: v["momentum_buffer"].clone() for k, v in opt.state_dict()["state"].items()}
    torch.manual_seed(123)
    random.seed(1)
    np.random.seed(2)
    rng = (torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy())

    preflight(model, (x, y), nn.CrossEntropyLoss(), optimizer=opt, **FAST)

    assert not model.training and not model[4].weight.requires_grad
    for k, v in model.state_dict().items():
        assert torch.equal(v, weights[k]), k
    assert {n for n, p in model.named_parameters() if p.grad is not None} == set(grads)
    for n, g in grads.items():
        assert torch.equal(model.get_parameter(n).grad, g), n
    after = opt.state_dict()
    assert after["param_groups"][0]["lr"] == 0.1
    for k, v in after["state"].items():
        assert torch.equal(v["momentum_buffer"], state[k])
    assert torch.equal(torch.get_rng_state(), rng[0])
    assert random.getstate() == rng[1]
    assert np.array_equal(np.random.get_state()[1], rng[2])


@pytest.mark.parametrize("given", [True, False])
def test_attached_monitor_records_nothing(tmp_path, given):
    model = planted.healthy()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    with Monitor(model, tmp_path / "run", optimizer=opt) as mon:
        report = preflight(model, planted.batch(), nn.CrossEntropyLoss(), optimizer=opt,
                           monitor=mon if given else None, **FAST)  # fmt: skip
        assert mon.step_count == 0 and mon.errors == 0
        mon.step()  # no forward ran on the model: the step has no activations
    run = load_run(tmp_path / "run")
    kinds = set(run.layers.column("kind").cast("string").to_pylist())
    assert "act" not in kinds and "grad" not in kinds
    stored = PreflightReport.load(tmp_path / "run")  # written only when the Monitor is given
    assert (stored.to_dict() == report.to_dict()) if given else stored is None


def test_run_without_preflight_has_none(tmp_path):
    assert PreflightReport.load(tmp_path) is None


def test_compiled_model_is_checked_eagerly_under_its_own_names():
    model = planted.healthy()
    report = preflight(torch.compile(model), planted.batch(), nn.CrossEntropyLoss(),
                       optimizer=torch.optim.SGD(model.parameters(), lr=1e-7), **FAST)  # fmt: skip
    assert {f.layer for f in report.of_kind("update_ratio") if f.layer} == {"0", "2", "4"}


def test_step_fn_with_a_dict_batch():
    x, y = planted.batch()

    def step_fn(model, batch):
        return F.cross_entropy(model(batch["x"]), batch["y"])

    report = preflight(planted.healthy(), {"x": x, "y": y}, step_fn=step_fn, **FAST)
    (initial,) = report.of_kind("initial_loss")
    assert initial.severity == "info" and "cannot be inferred" in initial.message
    report = preflight(planted.healthy(), {"x": x, "y": y}, step_fn=step_fn, num_classes=10,
                       **FAST)  # fmt: skip
    (initial,) = report.of_kind("initial_loss")
    assert initial.evidence["classes"] == 10


def test_losses_without_classes_say_so():
    x, _ = planted.batch()
    report = preflight(planted.healthy(), (x, torch.zeros(len(x), 10)), nn.MSELoss(), **FAST)
    (initial,) = report.of_kind("initial_loss")
    assert "MSELoss is not a known classification loss" in initial.message
    report = preflight(planted.healthy(), (x, torch.zeros(len(x), 10)), nn.BCEWithLogitsLoss(),
                       **FAST)  # fmt: skip
    (initial,) = report.of_kind("initial_loss")
    assert initial.evidence["classes"] == 2


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"batch": (1, 2, 3)}, ValueError, "batch must be a pair"),
        ({"loss_fn": nn.CrossEntropyLoss(reduction="none")}, ValueError, "not a scalar"),
        ({"loss_fn": lambda out, y: out.detach().sum()}, ValueError, "does not require grad"),
        ({"loss_fn": lambda out, y: 1.0}, TypeError, "not a torch.Tensor"),
        ({"loss_fn": None}, ValueError, "exactly one of loss_fn"),
        ({"step_fn": lambda m, b: m(b[0]).sum()}, ValueError, "exactly one of loss_fn"),
        ({"model": lambda x: x}, TypeError, "model must be"),
        ({"optimizer": "adam"}, TypeError, "optimizer must be"),
        ({"steps": 0}, ValueError, "steps must be"),
        ({"num_classes": 1}, ValueError, "num_classes must be"),
        ({"lr_range": (1.0, 1e-3)}, ValueError, "lr_range"),
        ({"monitor": "runs/x"}, TypeError, "monitor must be"),
    ],
)
def test_bad_arguments_are_named(kwargs, error, match):
    arguments = {"model": planted.healthy(), "batch": planted.batch(),
                 "loss_fn": nn.CrossEntropyLoss(), **FAST, **kwargs}  # fmt: skip
    with pytest.raises(error, match=match):
        preflight(**arguments)


@pytest.mark.parametrize(
    "make",
    [
        lambda ps: torch.optim.AdamW(ps, lr=1e-3, weight_decay=0.1),  # takes no defaults back
        lambda ps: torch.optim.LBFGS(ps, lr=0.5, max_iter=3),  # steps only with a closure
        lambda ps: torch.optim.RMSprop(ps, lr=1e-3),
    ],
)
def test_optimizers_are_rebuilt_on_the_copy(make):
    model = planted.healthy()
    opt = make(model.parameters())
    report = preflight(model, planted.batch(), nn.CrossEntropyLoss(), optimizer=opt, **FAST)
    assert report.settings["optimizer"].startswith(type(opt).__name__)
    assert not [f for f in report.of_kind("no_gradient") if f.severity != "info"]
