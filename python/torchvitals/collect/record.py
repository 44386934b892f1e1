"""A step's telemetry as plain data, and the table columns the writer thread makes of it.

The training thread builds a :class:`StepRecord` at ``Monitor.step()`` (names, host
scalars, and one non-blocking device-to-host copy of the engine's outputs) and hands
its column methods to the writer; they run on the writer thread, where waiting for the
copy costs the training loop nothing. A record holds no reference to the Monitor.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from torchvitals.collect.distributed import LIVE_SCALARS
from torchvitals.collect.host_copy import HostCopy
from torchvitals.collect.reductions import Reduction
from torchvitals.engine import histogram
from torchvitals.engine.contract import COUNT_KEYS, MOMENT_KEYS
from torchvitals.engine.derived import gradient_totals, norm

MEASURES = ("rectifier", "named", "bounded", "probabilities", "linear", "norm")
#: ``layers`` column: (the engine's count it comes from, the roles where it is measured).
#: The engine's "saturated" count is |x| >= the module's threshold: saturation of a bounded
#: activation, a large pre-activation (|x| >= 6) on a linear layer or norm.
MEASURED_COLUMNS: dict[str, tuple[str, tuple[str, ...]]] = {
    "units": ("units", ("rectifier", "named", "bounded", "probabilities")),
    "dead_units": ("dead_units", ("rectifier", "named")),
    "saturated": ("saturated", ("bounded", "probabilities")),
    "saturated_units": ("saturated_units", ("bounded", "probabilities")),
    "large": ("saturated", ("linear", "norm")),
}


@dataclass(frozen=True)
class StepRecord:
    step: int
    host_scalars: dict[str, float]
    device_scalars: list[str]  # names of the values in the copy's "scalars"
    kinds: list[str]  # per reduction
    names: list[list[str]]  # per reduction, its rows
    roles: np.ndarray  # per row, the module role of an activation (None for parameters)
    copy: HostCopy

    @classmethod
    def start(
        cls,
        step: int,
        reductions: list[Reduction],
        host_scalars: dict[str, float],
        device_scalars: dict[str, torch.Tensor],
        histograms: bool,
    ) -> StepRecord:
        """Starts the copy of ``reductions`` and ``device_scalars`` to the host."""
        tensors: dict[str, torch.Tensor] = {}
        for i, r in enumerate(reductions):
            tensors[f"{i}.moments"], tensors[f"{i}.counts"] = r.moments, r.counts
            if histograms:
                tensors[f"{i}.hist"] = r.hist
        if device_scalars:
            tensors["scalars"] = torch.stack(list(device_scalars.values()))
        return cls(
            step=step,
            host_scalars=dict(host_scalars),
            device_scalars=list(device_scalars),
            kinds=[r.kind for r in reductions],
            names=[r.names for r in reductions],
            roles=np.array([role for r in reductions for role in r.roles], dtype=object),
            copy=HostCopy(tensors),
        )

    @property
    def has_layers(self) -> bool:
        return bool(self.kinds)

    def _rows(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "layer": [n for names in self.names for n in names],
            "kind": [
                kind for kind, names in zip(self.kinds, self.names, strict=True) for _ in names
            ],
        }

    def _stacked(self, part: str) -> np.ndarray:
        a = self.copy.wait()
        return np.concatenate([a[f"{i}.{part}"] for i in range(len(self.kinds))])

    def scalar_columns(self) -> dict[str, Any]:
        """``scalars`` rows: host and device scalars, and the global gradient norm and
        non-finite count over every gradient this rank recorded."""
        a = self.copy.wait()
        values = dict(self.host_scalars)
        if self.device_scalars:
            values.update(zip(self.device_scalars, a["scalars"].tolist(), strict=True))
        grads = [i for i, kind in enumerate(self.kinds) if kind == "grad"]
        if grads:
            totals = [gradient_totals(a[f"{i}.moments"], a[f"{i}.counts"]) for i in grads]
            values["grad_norm"] = norm(sum(float(sumsq) for sumsq, _ in totals))
            values["grad_nonfinite"] = float(sum(int(nonfinite) for _, nonfinite in totals))
        return {"step": self.step, "name": list(values), "value": list(values.values())}

    def layer_columns(self) -> dict[str, Any]:
        """``layers`` rows: one per recorded tensor."""
        moments, counts = self._stacked("moments"), self._stacked("counts")
        cols = self._rows()
        cols.update({k: counts[:, j] for j, k in enumerate(COUNT_KEYS)})
        cols.update({k: moments[:, j] for j, k in enumerate(MOMENT_KEYS)})
        # A count is written only where it measures something, null elsewhere: "0 dead"
        # on a Linear layer, or "saturated" logits, would read as findings.
        measured = {role: self.roles == role for role in MEASURES}
        for column, (source, roles) in MEASURED_COLUMNS.items():
            valid = np.logical_or.reduce([measured[r] for r in roles])
            cols[column] = np.ma.array(counts[:, COUNT_KEYS.index(source)], mask=~valid)
        return cols

    def hist_columns(self) -> dict[str, Any]:
        """``hist`` rows: one per recorded tensor, every element and the negative ones."""
        hist = self._stacked("hist")
        return {
            **self._rows(),
            "counts": hist[:, histogram.ALL_ROW],
            "neg_counts": hist[:, histogram.NEGATIVE_ROW],
        }


@dataclass(frozen=True)
class LiveRecord:
    """The live mode's global scalars of one step (``LIVE_SCALARS``), on their way to the host."""

    step: int
    copy: HostCopy

    def scalar_columns(self) -> dict[str, Any]:
        return {"step": self.step, "name": list(LIVE_SCALARS), "value": self.copy.wait()["live"]}
