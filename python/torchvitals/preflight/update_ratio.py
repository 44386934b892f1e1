"""``update_ratio``: per layer, ||Δw|| / ||w|| after one optimizer step (a layer's weight
and bias together). Around 1e-4 to 1e-1 is usual (Adam's first step moves every element
by about the LR, so wide layers sit at the top); a decade beyond either end means the
layer is rewritten in a step or hardly moves at all."""

from __future__ import annotations

import math
from collections import defaultdict

import numpy as np

from .report import Finding, short_list
from .single_batch import SingleBatchRun
from .workbench import layer_of

USUAL = (1e-4, 1e-1)
LOW, HIGH = 1e-5, 1.0  # flagged beyond: a decade outside the usual range
CRIT_LOW, CRIT_HIGH = 1e-7, 10.0


def layer_ratios(run: SingleBatchRun) -> tuple[dict[str, float], list[str]]:
    """``({layer: ratio}, layers starting at zero)`` over the parameters that moved in the
    first step (those that never move are ``no_gradient``'s)."""
    update: dict[str, float] = defaultdict(float)
    weight: dict[str, float] = defaultdict(float)
    for name, du, w in zip(run.names, run.first_update_sq, run.init_sq, strict=True):
        if du > 0:
            update[layer_of(name)] += du
            weight[layer_of(name)] += w
    ratios = {k: math.sqrt(update[k] / weight[k]) for k in update if weight[k] > 0}
    return ratios, [k for k in update if weight[k] == 0]


def update_ratio_findings(run: SingleBatchRun) -> list[Finding]:
    if not run.first_update_sq:
        return []
    ratios, from_zero = layer_ratios(run)
    step = f"one {run.optimizer} step"
    findings = []
    for layer, r in ratios.items():
        if LOW <= r <= HIGH:
            continue
        large = r > HIGH or not math.isfinite(r)
        critical = r > CRIT_HIGH or r < CRIT_LOW or not math.isfinite(r)
        what = (
            "the step rewrites the layer: the LR is too large for it"
            if large
            else "updates too small to move it: the LR is too small, or its gradient vanishes"
        )
        findings.append(
            Finding(
                "update_ratio",
                "critical" if critical else "warning",
                layer,
                f"{step} changes {layer} by {r:.2g}x its norm (||Δw||/||w||; usual "
                f"{USUAL[0]:g} to {USUAL[1]:g}): {what}",
                {"ratio": r, "usual_low": USUAL[0], "usual_high": USUAL[1]},
            )
        )
    if ratios:
        lo, hi = min(ratios, key=ratios.get), max(ratios, key=ratios.get)
        median = float(np.median(list(ratios.values())))
        summary = (
            f"{step}: ||Δw||/||w|| from {ratios[lo]:.2g} ({lo}) to {ratios[hi]:.2g} ({hi}), "
            f"median {median:.2g} over {len(ratios)} layers"
        )
    else:
        summary = f"{step} moved no layer with a non-zero initial norm"
    if from_zero:
        summary += f"; starting at zero (no ratio): {short_list(from_zero)}"
    evidence = {"ratios": ratios, "from_zero": from_zero, "flagged": len(findings)}
    return [*findings, Finding("update_ratio", "info", None, summary, evidence)]
