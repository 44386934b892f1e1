"""The gradient check's care with modules that are not plain float64 functions: dropout,
other random or nondeterministic modules, modules that refuse float64, and a batch slice
that is too small for the model."""

from __future__ import annotations

import random

import planted
import torch
from torch import nn

from torchvitals import preflight

NO_TRAINING = {"steps": 1, "lr_probe_steps": 0}


class Float32Only(nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != torch.float32:
            raise TypeError("this kernel takes float32 only")
        return super().forward(x)


class Jitter(nn.Module):
    """Noise from Python's RNG (which the check cannot seed) in train mode."""

    def __init__(self, always: bool = False) -> None:
        super().__init__()
        self.always = always

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training or self.always:
            return x * (1 + 1e-3 * random.random())
        return x


def gradient_check(middle: nn.Module, **kwargs):
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(planted.FEATURES, 32), nn.Tanh(), middle, nn.Linear(32, planted.CLASSES)
    )
    report = preflight(model, planted.batch(), nn.CrossEntropyLoss(), **NO_TRAINING, **kwargs)
    (summary,) = [f for f in report.of_kind("gradient_check") if f.layer is None]
    assert not [f for f in report.of_kind("gradient_check") if f.severity != "info"]
    return summary


def test_dropout_runs_in_eval_mode():
    summary = gradient_check(nn.Dropout(0.5))
    assert "dropout in eval mode: 2" in summary.message
    assert summary.evidence["layers"] == 2 and summary.evidence["max_error"] < 1e-6


def test_random_torch_modules_draw_the_same_numbers_every_forward():
    summary = gradient_check(nn.RReLU())  # random slopes in train mode, from torch's RNG
    assert summary.evidence["layers"] == 2 and "eval mode" not in summary.message


def test_nondeterministic_module_is_put_in_eval_mode():
    summary = gradient_check(Jitter())
    assert "2 in eval mode (nondeterministic)" in summary.message
    assert summary.evidence["layers"] == 2


def test_module_nondeterministic_in_eval_mode_too_skips_the_check():
    summary = gradient_check(Jitter(always=True))
    assert summary.message.startswith("skipped: 2 gives different outputs for the same input")


def test_module_refusing_float64_keeps_its_dtype_and_is_skipped():
    summary = gradient_check(Float32Only(32, 32))
    assert "not float64-capable, kept in their dtype: 2" in summary.message
    assert summary.evidence["low_precision_modules"] == ["2"]
    assert summary.evidence["layers"] == 2  # "0" and "3" checked, "2" not


def test_batch_slice_too_small_for_the_model_skips_the_check():
    summary = gradient_check(nn.BatchNorm1d(32), grad_check_samples=1)
    assert summary.message.startswith("skipped: the model does not run on 1 samples")
