"""``no_gradient``: parameters that require grad but never receive one (a detached
branch, an unused module), receive only zeros, or receive one but never change (left out
of the optimizer's param groups, or in a group with lr=0)."""

from __future__ import annotations

from collections import defaultdict

from .report import Finding, short_list
from .single_batch import SingleBatchRun
from .workbench import OptimizerRecipe, layer_of


def _why_frozen(name: str, recipe: OptimizerRecipe) -> str:
    found = recipe.group_of(name)
    if found is None:
        return "it is in no param group of the optimizer"
    index, options = found
    if not options.get("lr", 1.0):
        return f"its param group {index} has lr=0"
    return f"the optimizer leaves it unchanged (param group {index})"


def no_gradient_findings(run: SingleBatchRun, recipe: OptimizerRecipe) -> list[Finding]:
    steps = len(run.losses)
    # (layer, what) -> parameter names, so that a layer's weight and bias share one line
    grouped: dict[tuple[str, str], list[str]] = defaultdict(list)
    for i, name in enumerate(run.names):
        if not run.got_grad[i]:
            what = f"no gradient in {steps} steps (a detached branch or an unused module)"
        elif not run.nonzero[i]:
            what = f"gradient exactly zero in all {steps} steps"
        elif not run.changed[i]:
            what = f"gradients but no change in {steps} steps: {_why_frozen(name, recipe)}"
        else:
            continue
        grouped[(layer_of(name), what)].append(name)
    findings = [
        Finding(
            "no_gradient",
            "warning",
            layer,
            f"{short_list(names)}: {what}",
            {"parameters": names, "steps": steps},
        )
        for (layer, what), names in grouped.items()
    ]
    if not findings:
        findings.append(
            Finding(
                "no_gradient",
                "info",
                None,
                f"all {len(run.names)} parameters that require grad received non-zero "
                f"gradients and changed in {steps} steps",
                {"parameters": len(run.names), "steps": steps},
            )
        )
    return findings
