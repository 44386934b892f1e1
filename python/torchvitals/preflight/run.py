"""``preflight``: every check, in order, on a copy of the model; the report, and its file
in the run directory when a Monitor is given."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from torchvitals.collect.distributed import unwrap
from torchvitals.collect.monitor import Monitor
from torchvitals.store.preflight_file import write_preflight

from .activations import recorded_units, unit_findings
from .gradient_check import gradient_check_findings
from .gradient_flow import no_gradient_findings
from .initial_loss import initial_loss_finding, reference_classes
from .lr_probe import lr_sanity
from .overfit import overfit_finding
from .report import Finding, PreflightReport
from .single_batch import run_single_batch
from .update_ratio import update_ratio_findings
from .workbench import (
    LossFn,
    OptimizerRecipe,
    Step,
    StepFn,
    Workbench,
    copy_model,
    preserved_rng,
)


def _check_int(name: str, value: object, least: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise ValueError(f"{name} must be an integer >= {least}, got {value!r}")


def _check_arguments(
    model: object,
    batch: object,
    loss_fn: object,
    step_fn: object,
    optimizer: object,
    num_classes: object,
    lr_range: object,
    monitor: object,
) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if (loss_fn is None) == (step_fn is None):
        raise ValueError(
            "pass exactly one of loss_fn (called as loss_fn(model(inputs), targets)) and "
            "step_fn (called as step_fn(model, batch))"
        )
    if not callable(loss_fn if step_fn is None else step_fn):
        which = "loss_fn" if step_fn is None else "step_fn"
        raise TypeError(f"{which} must be callable, got {type(loss_fn or step_fn).__name__}")
    if step_fn is None and not (isinstance(batch, (tuple, list)) and len(batch) == 2):
        got = f"a {type(batch).__name__}" + (
            f" of {len(batch)} items" if isinstance(batch, (tuple, list)) else ""
        )
        raise ValueError(
            f"batch must be a pair (inputs, targets) when loss_fn is given, got {got}; "
            "pass step_fn=lambda model, batch: loss for other shapes of training step"
        )
    if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(
            f"optimizer must be a torch.optim.Optimizer or None, got {type(optimizer).__name__}"
        )
    if num_classes is not None:
        _check_int("num_classes", num_classes, 2)
    if not (
        isinstance(lr_range, (tuple, list))
        and len(lr_range) == 2
        and all(isinstance(v, (int, float)) and v > 0 for v in lr_range)
        and lr_range[0] < lr_range[1]
    ):
        raise ValueError(f"lr_range must be (low, high) with 0 < low < high, got {lr_range!r}")
    if monitor is not None and not isinstance(monitor, Monitor):
        raise TypeError(f"monitor must be a torchvitals.Monitor, got {type(monitor).__name__}")


class _Clock:
    """Wall time of each check, for the report."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._start = time.perf_counter()

    def timed(self, name: str, fn: Callable[..., Any], *args: Any) -> Any:
        start = time.perf_counter()
        try:
            return fn(*args)
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start

    def total(self) -> dict[str, float]:
        return {**self.seconds, "total": time.perf_counter() - self._start}


def _initial(bench: Workbench, num_classes: int | None) -> tuple[list[Finding], float]:
    """``initial_loss``, ``dead_at_init`` and ``saturated_at_init`` from one forward."""
    bench.reset()
    with recorded_units(bench.model) as units, torch.no_grad():
        loss, output = bench.step(bench.model, bench.batch)
    value = float(loss)
    classes, source = reference_classes(bench.step.loss_fn, output, num_classes)
    return [initial_loss_finding(value, classes, source), *unit_findings(units)], value


def preflight(
    model: nn.Module,
    batch: Any,
    loss_fn: LossFn | None = None,
    *,
    step_fn: StepFn | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    num_classes: int | None = None,
    steps: int = 200,
    lr_probe_steps: int = 5,
    lr_range: tuple[float, float] = (1e-5, 1.0),
    grad_check_samples: int = 4,
    seed: int = 0,
    monitor: Monitor | None = None,
) -> PreflightReport:
    """Checks, before training, that ``model`` can learn from ``batch``.

    ``batch`` is ``(inputs, targets)`` and the loss ``loss_fn(model(inputs), targets)``, as
    with ``nn.CrossEntropyLoss()``; ``step_fn(model, batch) -> loss`` replaces both for other
    shapes of training step. Everything runs on a deep copy: the model, the optimizer (whose
    class and param groups are rebuilt on the copy, with fresh state; Adam at 1e-3 when
    ``optimizer`` is None) and the RNG states are left as they were.

    Checks and their knobs: ``initial_loss`` (against ln C, C from ``num_classes`` or the
    output of a classification loss); ``dead_at_init`` / ``saturated_at_init`` (one
    forward); ``gradient_check`` (float64, on the first ``grad_check_samples`` samples; 0
    skips it); ``cannot_overfit``, ``no_gradient`` and ``update_ratio`` (training on the
    batch for up to ``steps`` steps, stopping once the loss is below 10% of its start);
    ``lr_sanity`` (``lr_probe_steps`` steps at one LR per decade of ``lr_range``; 0 skips
    it). With ``monitor``, the report is also written to the run directory
    (``preflight.json``), where ``torchvitals report`` shows it.
    """
    _check_arguments(model, batch, loss_fn, step_fn, optimizer, num_classes, lr_range, monitor)
    _check_int("steps", steps, 1)
    _check_int("lr_probe_steps", lr_probe_steps, 0)
    _check_int("grad_check_samples", grad_check_samples, 0)
    clock = _Clock()
    findings: list[Finding] = []
    model, _ = unwrap(model)  # names without DDP's "module." or compile's "_orig_mod."
    with preserved_rng(model), torch.enable_grad():
        work = copy_model(model, monitor)
        recipe = (
            OptimizerRecipe.default(work)
            if optimizer is None
            else OptimizerRecipe.of(optimizer, model)
        )
        bench = Workbench(work, batch, Step(loss_fn, step_fn), recipe, seed)
        found, start = clock.timed("initial", _initial, bench, num_classes)
        findings += found
        if grad_check_samples:
            findings += clock.timed(
                "gradient_check", gradient_check_findings, bench, grad_check_samples
            )
        run = clock.timed("single_batch", run_single_batch, bench, steps, lr_probe_steps + 1)
        findings += [overfit_finding(run), *no_gradient_findings(run, recipe)]
        findings += update_ratio_findings(run)
        if lr_probe_steps:
            findings.append(
                clock.timed("lr_probe", lr_sanity, bench, run, lr_probe_steps, lr_range, start)
            )
    settings = {
        "steps": steps,
        "lr_probe_steps": lr_probe_steps,
        "lr_range": list(lr_range),
        "grad_check_samples": grad_check_samples,
        "seed": seed,
        "optimizer": recipe.describe(),
        "num_classes": num_classes,
    }
    report = PreflightReport(findings, clock.total(), settings)
    if monitor is not None:
        write_preflight(monitor.path, report.to_dict())
    return report
