"""``gradient_check``: autograd against finite differences, on a float64 copy of the model
and the first few samples of the batch.

For every parameter tensor, the derivative of the loss along one direction ``v`` (the
autograd gradient's direction plus a random one, so that a zero or wrong gradient still
gives a non-zero finite difference) is taken both ways: ``<grad, v>`` from autograd and
``(L(w + h v) - L(w - h v)) / 2h`` at two step sizes ``h`` and ``8h``. A tensor is flagged
when the two finite differences agree with each other far better than with autograd: a kink
(ReLU, max-pool) crossed by one step, or rounding inside the model, makes them disagree
with each other instead, and the tensor is left inconclusive. A wrong backward (a custom
``autograd.Function`` is the usual culprit) breaks the gradient of every layer before it, so
the last flagged layer in forward order and the next one that passes bracket it.

Dropout modules run in eval mode; every forward starts from the same seed, so other
random modules draw the same numbers each time. A module that still gives different
outputs on the same input is put in eval mode, and the check is skipped if that does not
help. A module that fails in float64 runs in its own dtype between casts, and the check's
tolerances widen to float32 rounding.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .report import Finding, short_list
from .workbench import Workbench, cast_floats, layer_of, slice_batch

WARN, CRIT = 1e-2, 1e-1  # relative error between autograd and finite differences
AGREE = 10.0  # the two finite differences agree this much better than with autograd
MAX_REPAIRS = 8  # modules put in eval mode or kept in their dtype before giving up


@dataclass(frozen=True)
class TensorCheck:
    name: str
    autograd: float
    finite_diff: tuple[float, float]
    error: float  #: relative error of autograd against the closer finite difference
    flagged: bool
    inconclusive: bool


def _relative(a: float, b: float, floor: float) -> float:
    return abs(a - b) / max(abs(a), abs(b), floor)


class _CallStack:
    """Forward hooks on every module: which modules are running (the innermost one at an
    exception is the one that raised), the order of first calls, and each call's output."""

    def __init__(self, model: nn.Module) -> None:
        self.names = {m: n for n, m in model.named_modules()}
        self.running: list[nn.Module] = []
        self.order: list[str] = []
        self.outputs: list[tuple[str, Any]] = []
        self._handles = []
        for module in self.names:
            self._handles.append(module.register_forward_pre_hook(self._enter))
            self._handles.append(module.register_forward_hook(self._leave))

    def _enter(self, module: nn.Module, args: Any) -> None:
        self.running.append(module)
        if self.names[module] not in self.order:
            self.order.append(self.names[module])

    def _leave(self, module: nn.Module, args: Any, output: Any) -> None:
        self.running.pop()
        self.outputs.append((self.names[module], cast_floats(output, torch.float64)))

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


@contextmanager
def _watched(model: nn.Module) -> Iterator[_CallStack]:
    stack = _CallStack(model)
    try:
        yield stack
    finally:
        stack.remove()


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return a.shape == b.shape and bool(torch.equal(a.detach(), b.detach()))
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return True  # not a tensor: nothing to compare


def _keep_dtype(module: nn.Module, dtype: torch.dtype) -> None:
    """Runs ``module`` in ``dtype``, casting its inputs to it and its outputs to float64."""
    module.to(dtype)
    module.register_forward_pre_hook(lambda m, args: cast_floats(args, dtype))
    module.register_forward_hook(lambda m, args, out: cast_floats(out, torch.float64))


class GradientCheck:
    def __init__(self, bench: Workbench, samples: int) -> None:
        self.bench = bench
        bench.reset()
        self.model = copy.deepcopy(bench.model).to(torch.float64)
        self.batch = cast_floats(slice_batch(bench.batch, samples), torch.float64)
        self.notes: list[str] = []
        self.low_precision: list[str] = []  # modules kept in their own dtype
        self.order: list[str] = []
        dropout = [
            n for n, m in self.model.named_modules() if isinstance(m, nn.modules.dropout._DropoutNd)
        ]
        for name in dropout:
            self.model.get_submodule(name).eval()
        if dropout:
            self.notes.append(f"dropout in eval mode: {short_list(dropout)}")

    def loss(self) -> torch.Tensor:
        self.bench.seed_rng()  # random modules draw the same numbers each time
        return self.bench.step(self.model, self.batch)[0]

    def prepare(self) -> str | None:
        """Makes the float64 forward run and repeat itself; the reason when it cannot."""
        for _ in range(MAX_REPAIRS):
            with _watched(self.model) as stack, torch.no_grad():
                try:
                    first = self.loss()
                except Exception as exc:
                    culprit = stack.running[-1] if stack.running else self.model
                    if culprit is self.model:
                        return f"the model does not run in float64 ({type(exc).__name__}: {exc})"
                    name = stack.names[culprit]
                    original = self.bench.model.get_submodule(name)
                    dtype = next(
                        (p.dtype for p in original.parameters() if p.is_floating_point()),
                        torch.get_default_dtype(),
                    )
                    _keep_dtype(culprit, dtype)
                    self.low_precision.append(name)
                    continue
                outputs = stack.outputs
                stack.outputs = []
                second = self.loss()
                self.order = stack.order
            if not math.isfinite(float(first)):
                return f"the float64 loss is {float(first)}"
            if torch.equal(first, second):
                return None
            culprit = next(
                (
                    n
                    for (n, a), (_, b) in zip(outputs, stack.outputs, strict=False)
                    if not _same(a, b)
                ),
                None,
            )
            module = self.model.get_submodule(culprit) if culprit else self.model
            if culprit is None or not module.training:
                return (
                    f"{culprit or 'the model'} gives different outputs for the same input "
                    "(also in eval mode)"
                )
            module.eval()
            self.notes.append(f"{culprit} in eval mode (nondeterministic)")
        return "too many modules had to be repaired"

    def run(self) -> list[TensorCheck]:
        self.model.zero_grad(set_to_none=True)
        loss = self.loss()
        loss.backward()
        value = abs(float(loss.detach()))
        low = bool(self.low_precision)
        # Rounding noise of the loss, divided by the step, is the floor below which a
        # derivative cannot be told from zero; float32 modules need a longer step.
        unit = 2.0**-23 if low else 2.0**-52
        eps = 1e-3 if low else 1e-6
        kept = tuple(n + "." for n in self.low_precision)
        gen = torch.Generator().manual_seed(self.bench.seed)
        checks = []
        for name, p in self.model.named_parameters():
            if p.grad is None or name.startswith(kept) or not p.numel():
                continue
            grad = p.grad.to_dense().detach()
            rand = torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p.device)
            direction = rand / rand.norm()
            if grad.norm() > 0:
                direction = direction + grad / grad.norm()
            direction = direction / direction.norm()
            ad = float((grad * direction).sum())
            h = eps * max(1.0, float(p.detach().norm()))
            fds = tuple(self._finite_difference(p, direction, s) for s in (h, 8 * h))
            floor = 1e3 * unit * max(1.0, value) / h
            errors = [_relative(ad, fd, floor) for fd in fds]
            error = min(errors)
            spread = _relative(*fds, floor)
            flagged = error >= WARN and spread * AGREE <= error
            checks.append(TensorCheck(name, ad, fds, error, flagged, error >= WARN and not flagged))
        return checks

    def _finite_difference(self, p: torch.Tensor, v: torch.Tensor, h: float) -> float:
        saved = p.detach().clone()
        with torch.no_grad():
            p.add_(v, alpha=h)
            plus = float(self.loss())
            p.copy_(saved).sub_(v, alpha=h)
            minus = float(self.loss())
            p.copy_(saved)
        return (plus - minus) / (2 * h)


def _bracket(flagged: list[str], passed: list[str], order: list[str]) -> str:
    """Where the wrong backward lies: after the last flagged layer's forward, before the
    first layer run after it that passes."""
    position = {name: i for i, name in enumerate(order)}
    last = max(flagged, key=lambda n: position.get(n, -1))
    after = [n for n in passed if position.get(n, -1) > position.get(last, -1)]
    if not after:
        return f"the wrong backward is at or after {last}"
    first = min(after, key=lambda n: position[n])
    return f"the wrong backward is between {last} and {first} (a custom autograd.Function?)"


def gradient_check_findings(bench: Workbench, samples: int) -> list[Finding]:
    bench.reset()
    try:
        with torch.no_grad():
            bench.step(bench.model, slice_batch(bench.batch, samples))
    except Exception as exc:  # e.g. BatchNorm on a single sample
        skipped = f"the model does not run on {samples} samples ({type(exc).__name__}: {exc})"
        return [
            Finding("gradient_check", "info", None, f"skipped: {skipped}", {"skipped": skipped})
        ]
    check = GradientCheck(bench, samples)
    skipped = check.prepare()
    notes = list(check.notes)
    if check.low_precision:
        notes.append(f"not float64-capable, kept in their dtype: {short_list(check.low_precision)}")
    if skipped is not None:
        message = f"skipped: {skipped}" + "".join(f"; {n}" for n in notes)
        return [Finding("gradient_check", "info", None, message, {"skipped": skipped})]
    results = check.run()
    layers: dict[str, list[TensorCheck]] = {}
    for r in results:
        layers.setdefault(layer_of(r.name), []).append(r)
    flagged = [layer for layer, rs in layers.items() if any(r.flagged for r in rs)]
    passed = [layer for layer, rs in layers.items() if all(r.error < WARN for r in rs)]
    findings = []
    for layer in flagged:
        worst = max((r for r in layers[layer] if r.flagged), key=lambda r: r.error)
        findings.append(
            Finding(
                "gradient_check",
                "critical" if worst.error >= CRIT else "warning",
                layer,
                f"autograd and finite differences disagree on {worst.name}: relative error "
                f"{worst.error:.2g} (autograd {worst.autograd:.4g}, finite differences "
                f"{worst.finite_diff[0]:.4g}); {_bracket(flagged, passed, check.order)}",
                {
                    "error": worst.error,
                    "autograd": worst.autograd,
                    "finite_difference": worst.finite_diff[0],
                    "parameters": [r.name for r in layers[layer] if r.flagged],
                },
            )
        )
    inconclusive = [r.name for r in results if r.inconclusive]
    if inconclusive:
        notes.append(
            f"finite differences unstable (a kink or rounding) on {short_list(inconclusive)}"
        )
    largest = max(results, key=lambda r: r.error, default=None)
    summary = (
        f"{len(results)} parameter tensors in {len(layers)} layers checked on "
        f"{samples} samples in float64"
        + (f"; largest relative error {largest.error:.2g} ({largest.name})" if largest else "")
        + "".join(f"; {n}" for n in notes)
    )
    evidence = {
        "tensors": len(results),
        "layers": len(layers),
        "samples": samples,
        "max_error": largest.error if largest else 0.0,
        "flagged_layers": flagged,
        "inconclusive": inconclusive,
        "low_precision_modules": check.low_precision,
    }
    return [*findings, Finding("gradient_check", "info", None, summary, evidence)]
