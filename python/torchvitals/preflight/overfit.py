"""``cannot_overfit``: a model that cannot drive the loss of a single batch to a small
fraction of its start will not learn from many. When it cannot, the layers whose gradients
stayed at zero or went non-finite say where the signal stops."""

from __future__ import annotations

import math

from .report import Finding, short_list
from .single_batch import OVERFIT_FRACTION, SingleBatchRun
from .workbench import layer_of

#: Best loss still above this fraction of the start: the loss barely moved (critical).
BARELY_MOVED = 0.5


def _layers(run: SingleBatchRun, flags: list[bool]) -> list[str]:
    return list(dict.fromkeys(layer_of(n) for n, f in zip(run.names, flags, strict=True) if f))


def overfit_finding(run: SingleBatchRun) -> Finding:
    losses = run.losses
    start, final, best = losses[0], losses[-1], min(losses)
    zero = _layers(run, [not nz for nz in run.nonzero])
    nonfinite = _layers(run, run.nonfinite)
    evidence = {
        "start": start,
        "final": final,
        "best": best,
        "steps": len(losses),
        "target_fraction": OVERFIT_FRACTION,
        "optimizer": run.optimizer,
        "zero_grad_layers": zero,
        "nonfinite_grad_layers": nonfinite,
    }
    on = f"on one batch with {run.optimizer}"
    if not math.isfinite(start):
        return Finding(
            "cannot_overfit", "critical", None, f"the loss is {start} before training", evidence
        )
    if not math.isfinite(final):
        return Finding(
            "cannot_overfit",
            "critical",
            None,
            f"loss {start:.4g} became {final} at step {len(losses) - 1} {on}"
            + (f"; non-finite gradients in {short_list(nonfinite)}" if nonfinite else ""),
            evidence,
        )
    if start <= 0:
        return Finding(
            "cannot_overfit",
            "info",
            None,
            f"loss starts at {start:.4g} (not positive), so a fraction of it means nothing; "
            f"best {best:.4g} in {len(losses)} steps {on}",
            evidence,
        )
    reached = run.reached_at
    if reached is not None:
        evidence["reached_at"] = reached
        return Finding(
            "cannot_overfit",
            "info",
            None,
            f"loss {start:.4g} -> {losses[reached]:.4g} in {reached} steps {on} "
            f"(below {OVERFIT_FRACTION:.0%} of its start)",
            evidence,
        )
    why = []
    if zero:
        why.append(f"gradients zero throughout in {short_list(zero)}")
    if nonfinite:
        why.append(f"non-finite gradients in {short_list(nonfinite)}")
    return Finding(
        "cannot_overfit",
        "critical" if best > BARELY_MOVED * start else "warning",
        None,
        f"loss {start:.4g} -> best {best:.4g} in {len(losses)} steps {on}: never below "
        f"{OVERFIT_FRACTION:.0%} of its start" + ("; " + "; ".join(why) if why else ""),
        evidence,
    )
