"""``dead_at_init`` and ``saturated_at_init``: units dead or saturated on the batch at
initialisation, measured as the Monitor measures them: the modules
``collect.selection`` picks, their unit dim and saturation threshold, and the engine's
``dead_units`` / ``saturated`` counts. Dead units are counted after rectifiers, saturation
on bounded activations (their input) and softmax outputs; a large output of a linear layer
or a norm is not saturation (the Monitor records it as ``large``)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from torchvitals.collect.activations import first_tensor
from torchvitals.collect.selection import HookSpec, feature_dim, select_modules
from torchvitals.engine.op import tensor_stats

from .report import Finding

# A healthy network has next to no dead or saturated units at initialisation, so these
# are lower than the analysis' end-of-run thresholds.
DEAD_WARN, DEAD_CRIT = 0.25, 0.5  # fraction of units
SAT_WARN, SAT_CRIT = 0.25, 0.6  # fraction of elements (the Monitor's sat_frac)
MIN_PER_UNIT = 8  # fewer values per unit cannot tell a dead unit from chance
SATURATING_ROLES = ("bounded", "probabilities")


@dataclass(frozen=True)
class UnitStats:
    name: str
    spec: HookSpec
    numel: int
    units: int
    dead_units: int
    saturated: int
    saturated_units: int
    nonfinite: int


@contextmanager
def recorded_units(model: nn.Module) -> Iterator[list[UnitStats]]:
    """Within the block, each forward of ``model`` appends the unit statistics of every
    hooked module's first call to the yielded list."""
    rows: list[UnitStats] = []
    previous: list[tuple[int, int] | None] = [None]  # the last hooked layer's (ndim, dim)

    def hook(spec: HookSpec) -> Callable:
        def on_forward(module: nn.Module, args: Any, output: Any) -> None:
            x = first_tensor(args if spec.of_input else output)
            if x is None or not x.is_floating_point() or x.layout != torch.strided:
                return
            dim = feature_dim(spec, x.dim(), previous[0])
            if dim is not None and not spec.of_input:
                previous[0] = (x.dim(), dim)
            if any(r.name == spec.name for r in rows):  # a module called twice: first call
                return
            # Measured now: an in-place op later in the forward may overwrite x.
            s = tensor_stats([x.detach()], feature_dim=dim, saturation=spec.saturation)
            rows.append(
                UnitStats(
                    spec.name,
                    spec,
                    x.numel(),
                    int(s["units"][0]),
                    int(s["dead_units"][0]),
                    int(s["saturated"][0]),
                    int(s["saturated_units"][0]),
                    int(s["nan"][0] + s["inf"][0]),
                )
            )

        return on_forward

    handles = [m.register_forward_hook(hook(spec)) for m, spec in select_modules(model)]
    try:
        yield rows
    finally:
        for h in handles:
            h.remove()


def _severity(frac: float, warn: float, crit: float, enough: bool) -> str:
    if frac < warn or not enough:
        return "info"
    return "critical" if frac >= crit else "warning"


def _what_saturates(spec: HookSpec) -> str:
    if spec.of_input:
        return f"{spec.module_type} inputs with |z| >= {spec.saturation:g}"
    return f"probabilities >= {spec.saturation:g}"


def _few(r: UnitStats) -> tuple[bool, str]:
    per_unit = r.numel // r.units if r.units else 0
    if per_unit >= MIN_PER_UNIT:
        return True, ""
    return False, f" (only {per_unit} values per unit: too few to tell)"


def _dead(r: UnitStats) -> Finding:
    frac = r.dead_units / r.units
    enough, few = _few(r)
    return Finding(
        "dead_at_init",
        _severity(frac, DEAD_WARN, DEAD_CRIT, enough),
        r.name,
        f"{r.dead_units} of {r.units} units ({frac:.0%}) never positive on the batch after "
        f"{r.spec.module_type}{few}",
        {"dead_frac": frac, "dead_units": r.dead_units, "units": r.units},
    )


def _saturated(r: UnitStats) -> Finding:
    frac = r.saturated / r.numel
    enough, few = _few(r)
    every = f"; {r.saturated_units} of {r.units} units on every sample" if r.saturated_units else ""
    return Finding(
        "saturated_at_init",
        _severity(frac, SAT_WARN, SAT_CRIT, enough),
        r.name,
        f"{frac:.0%} of {_what_saturates(r.spec)}{every}{few}",
        {
            "sat_frac": frac,
            "saturated_units": r.saturated_units,
            "units": r.units,
            "threshold": r.spec.saturation,
        },
    )


def _summary(kind: str, modules: str, what: str, measured: list[tuple[float, str]]) -> Finding:
    if not measured:
        message = f"no {modules} module in the model (functional calls are not seen)"
        return Finding(kind, "info", None, message, {"modules": 0})
    frac, name = max(measured)
    message = f"no {modules} with {what} ({len(measured)} measured; most: {frac:.0%} in {name})"
    return Finding(kind, "info", None, message, {"modules": len(measured), "max_frac": frac})


def unit_findings(rows: list[UnitStats]) -> list[Finding]:
    """A finding per layer at or above the thresholds (info when the batch is too small
    to tell), else one summary line per check."""
    # Units of a tensor holding NaN/Inf are unknown, not dead (as in the analysis).
    dead = [r for r in rows if r.spec.counts_dead and r.units and not r.nonfinite]
    saturated = [r for r in rows if r.spec.role in SATURATING_ROLES and r.numel]
    found = [_dead(r) for r in dead if r.dead_units / r.units >= DEAD_WARN] or [
        _summary(
            "dead_at_init",
            "rectifier",
            f"{DEAD_WARN:.0%} or more dead units",
            [(r.dead_units / r.units, r.name) for r in dead],
        )
    ]
    found += [_saturated(r) for r in saturated if r.saturated / r.numel >= SAT_WARN] or [
        _summary(
            "saturated_at_init",
            "bounded activation or softmax",
            f"{SAT_WARN:.0%} or more saturated values",
            [(r.saturated / r.numel, r.name) for r in saturated],
        )
    ]
    return found
