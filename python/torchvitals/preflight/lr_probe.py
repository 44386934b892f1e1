"""``lr_sanity``: a short LR range probe. From the initial state, a few steps at one LR per
decade (the user's optimizer, every param group's LR scaled alike), and the loss after
them; then where the user's LR sits on that curve. A few steps favour large LRs, so the
best probe LR is an upper end, not a recommendation: the user's LR is flagged when it is
right of the best and lowers the loss less than half as much (critical when not at all), or
three decades or more left of it with less than a tenth of its progress."""

from __future__ import annotations

import math

import numpy as np

from .report import Finding
from .single_batch import SingleBatchRun
from .workbench import Workbench

RIGHT_PROGRESS = 0.5  # right of the best, with less than half its progress: warning
LEFT_PROGRESS = 0.1  # far left, with less than a tenth of its progress: warning
LEFT_DECADES = 3.0
DIVERGED = 2.0


def probe_lrs(lr_range: tuple[float, float]) -> list[float]:
    """One LR per decade from ``lr_range[0]`` to ``lr_range[1]``."""
    lo, hi = (math.log10(v) for v in lr_range)
    # rounded to 12 digits, so that 1e-5 reads as 1e-05 and not 1.0000000000000003e-05
    return [float(f"{v:.12g}") for v in np.logspace(lo, hi, max(2, round(hi - lo) + 1))]


def _diverged(loss: float, start: float) -> bool:
    """Not finite, or risen DIVERGED times the start's size above it."""
    return not loss <= start + DIVERGED * abs(start)


def loss_after(bench: Workbench, lr: float, steps: int, start: float) -> float:
    """The loss after ``steps`` steps at ``lr`` from the initial state; inf once it has
    diverged (the steps left are not run)."""
    bench.reset()
    optimizer = bench.optimizer.build(bench.model, lr)
    losses = bench.train(optimizer, steps, until=lambda losses: _diverged(losses[-1], start))
    value = math.inf if _diverged(losses[-1], start) else bench.loss()
    return math.inf if _diverged(value, start) else value


def lr_curve(
    bench: Workbench,
    steps: int,
    lr_range: tuple[float, float],
    start: float,
    known: dict[float, float],
) -> list[tuple[float, float]]:
    """``(lr, loss after steps)`` for each probe LR and those in ``known`` (already
    measured, e.g. the user's LR by the single-batch run), sorted by LR."""
    curve = dict(known)
    for lr in probe_lrs(lr_range):
        if not any(math.isclose(lr, k, rel_tol=1e-6) for k in curve):
            curve[lr] = loss_after(bench, lr, steps, start)
    return sorted(curve.items())


def lr_finding(
    curve: list[tuple[float, float]], start: float, user_lr: float, steps: int
) -> Finding:
    lrs = [lr for lr, _ in curve]
    losses = [loss for _, loss in curve]
    progress = {lr: start - loss for lr, loss in curve}  # -inf where it diverged
    best = max(lrs, key=lambda lr: progress[lr])
    user = progress[user_lr]
    decades = math.log10(user_lr / best)
    evidence = {
        "lrs": lrs,
        "losses": losses,
        "start": start,
        "steps": steps,
        "user_lr": user_lr,
        "best_lr": best,
        "decades_from_best": decades,
    }
    after = f"after {steps} steps"
    loss = curve[lrs.index(user_lr)][1]
    at_user = (
        f"loss {loss:.4g} {after} (start {start:.4g})"
        if math.isfinite(loss)
        else f"the loss diverges within {steps} steps (start {start:.4g})"
    )
    side = "right" if decades > 0 else "left"
    where = (
        f"LR {user_lr:.3g} sits {abs(decades):.1f} decades {side} of the probe's best {best:.3g}"
    )
    if progress[best] <= 0:
        return Finding(
            "lr_sanity",
            "warning",
            None,
            f"no LR from {lrs[0]:.0e} to {lrs[-1]:.0e} lowers the loss {after}",
            evidence,
        )
    if decades > 0 and user <= 0:
        severity, message = "critical", f"{where}: {at_user}: the LR is far too large"
    elif decades > 0 and user < RIGHT_PROGRESS * progress[best]:
        severity, message = "warning", f"{where}: {at_user}: the LR is too large"
    elif decades <= -LEFT_DECADES and user < LEFT_PROGRESS * progress[best]:
        severity, message = "warning", f"{where}: {at_user}: the LR is probably too small"
    elif decades == 0:
        severity, message = "info", f"LR {user_lr:.3g} is the probe's best: {at_user}"
    else:
        severity, message = "info", f"{where}; {at_user}"
    return Finding("lr_sanity", severity, None, message, evidence)


def lr_sanity(
    bench: Workbench, run: SingleBatchRun, steps: int, lr_range: tuple[float, float], start: float
) -> Finding:
    """The probe around the user's LR, whose own point the single-batch run measured."""
    user_lr = bench.optimizer.lr
    if not user_lr or not math.isfinite(start):
        why = (
            f"the optimizer's LR is {user_lr}" if math.isfinite(start) else "the loss is not finite"
        )
        return Finding("lr_sanity", "info", None, f"skipped: {why}", {"user_lr": user_lr})
    losses = run.losses
    if len(losses) > steps:
        at_user = math.inf if _diverged(losses[steps], start) else losses[steps]
    elif _diverged(losses[-1], start):
        at_user = math.inf
    else:  # the run was shorter than the probe
        at_user = loss_after(bench, user_lr, steps, start)
    curve = lr_curve(bench, steps, lr_range, start, {user_lr: at_user})
    return lr_finding(curve, start, user_lr, steps)
