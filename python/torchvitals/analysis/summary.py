"""What the reports show of a run, as plain rows and arrays: the HTML report
(:mod:`torchvitals.report.html`) and the terminal summary (:mod:`torchvitals.report.terminal`)
both render these and compute nothing of their own.

* :func:`event_rows`: one row per event, with the columns :data:`EVENT_COLUMNS`, its layer
  attribution as text (:func:`attribution_text`);
* :func:`worst_layers`: layers ranked by how unhealthy they look anywhere in the run, with
  the columns :data:`WORST_COLUMNS`;
* :func:`histogram_layers`: the layers whose histogram evolution is worth plotting;
* :func:`histogram_matrix`: one layer's histogram over steps, from the run's ``hist`` table.

``series`` is the dict of ``series_from_run`` (:mod:`torchvitals.analysis.runtables`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from .events import Event

if TYPE_CHECKING:
    from torchvitals.store.reader import Run

__all__ = [
    "EVENT_COLUMNS",
    "WORST_COLUMNS",
    "attribution_text",
    "event_rows",
    "histogram_layers",
    "histogram_matrix",
    "worst_layers",
]

WORST_COLUMNS = [
    "layer",
    "severity",
    "findings",
    "score",
    "max_dead_frac",
    "max_sat_frac",
    "max_large_frac",
    "nonfinite",
    "grad_norm_last",
    "grad_norm_range",
]


_SEV = {"": 0, "info": 1, "warning": 2, "critical": 3}


def _layer_severity(series, events):
    """{layer: (worst severity, kinds)} from the layer findings (``events``, or the findings
    computed here from ``series``); a parameter (``<module>.<name>``) also counts for its
    module, and a non-finite layer is critical."""
    from .layers import layer_findings

    if events is None:
        n = max((np.asarray(v).size for v in series.values()), default=0)
        layer_only = {k: np.asarray(v, np.float64) for k, v in series.items() if "/" in k}
        layer_only = {k: v for k, v in layer_only.items() if v.size == n}
        # growth is judged against the loss curve (a layer waking up as the loss kicks
        # in is no instability): without the run's events it sets no severity
        events = [
            f
            for f in (layer_findings(np.arange(n), layer_only) if n else [])
            if f.kind not in ("exploding_gradient", "weight_norm_growth")
        ]
    out: dict[str, tuple[str, list[str]]] = {}
    for ev in events:
        if ev.kind in ("nonfinite",) or not (ev.layer or ev.layers):
            continue
        names = [ev.layer] if ev.layer else []
        if ev.kind not in ("kick_in", "lr_drop", "lr_rise", "spike", "divergence"):
            names += [a for a, *_ in ev.layers]
        for name in dict.fromkeys(names):
            for key in {name, name.rpartition(".")[0] or name}:
                sev, kinds = out.get(key, ("", []))
                if _SEV[ev.severity] > _SEV[sev]:
                    sev = ev.severity
                if ev.kind not in kinds:
                    kinds = [*kinds, ev.kind]
                out[key] = (sev, kinds)
    return out


def worst_layers(
    series: dict[str, np.ndarray], limit: int = 10, events: Sequence[Event] | None = None
) -> list[dict[str, object]]:
    """Layers ranked by how unhealthy they look anywhere in the run: layers with a
    critical finding first, then warnings, then the rest; within a severity by ``score``
    (dead + saturated + large fractions, 10 for non-finite values, 0.2 per decade of
    gradient-norm range). ``events``: the run's events (default: the layer findings
    computed from ``series``)."""
    sev = _layer_severity(series, events)
    layers: dict[str, dict[str, float]] = {}
    for key, values in series.items():
        if "/" not in key or not np.isfinite(values).any():
            continue
        metric, layer = key.split("/", 1)
        row = layers.setdefault(layer, {})
        finite = values[np.isfinite(values)]
        if metric in ("dead_frac", "sat_frac", "large_frac"):
            row[f"max_{metric}"] = float(finite.max())
        elif metric == "nonfinite":
            row["nonfinite"] = float(finite.sum())
        elif metric == "grad_norm":
            row["grad_norm_last"] = float(finite[-1])
            positive = finite[finite > 0]
            if positive.size >= 2:
                row["grad_norm_range"] = float(np.log10(positive.max() / positive.min()))
    scored = []
    for layer, row in layers.items():
        score = (
            row.get("max_dead_frac", 0.0)
            + row.get("max_sat_frac", 0.0)
            + row.get("max_large_frac", 0.0)
            + (10.0 if row.get("nonfinite", 0.0) else 0.0)
            + 0.2 * row.get("grad_norm_range", 0.0)
        )
        worst, kinds = sev.get(layer, ("", []))
        if row.get("nonfinite", 0.0):
            worst, kinds = "critical", [*kinds, "nonfinite"]
        entry: dict[str, object] = {"layer": layer}
        if worst:
            entry["severity"] = worst
            entry["findings"] = ", ".join(kinds)
        entry["score"] = round(score, 3)
        entry.update({k: round(v, 4) for k, v in row.items()})
        scored.append(entry)
    scored.sort(key=lambda r: (-_SEV[str(r.get("severity", ""))], -float(r["score"])))
    return scored[:limit]


def attribution_text(event: Event, top: int = 3) -> str:
    """The first ``top`` attributed changes, e.g. ``fc1 grad_norm x4.2 (lead 12)``."""
    parts = []
    for layer, metric, change, lead in list(event.layers)[:top]:
        # fractions change by a difference, everything else by a log-ratio (analysis.Event)
        size = f"{change:+.2f}" if metric.endswith("_frac") else f"x{math.exp(change):.3g}"
        parts.append(f"{layer} {metric} {size} (lead {lead})")
    return "; ".join(parts)


EVENT_COLUMNS = ["kind", "step", "end_step", "severity", "layer", "cause", "attribution"]


def event_rows(events: Sequence[Event]) -> list[dict[str, object]]:
    rows = []
    for ev in events:
        rows.append(
            {
                "kind": ev.kind,
                "step": ev.step,
                "end_step": ev.end_step,
                "severity": ev.severity,
                "layer": ev.layer or "",
                "cause": ev.cause,
                "attribution": attribution_text(ev),
            }
        )
    return rows


def histogram_layers(run: Run, series: dict[str, np.ndarray], count: int = 3) -> list[str]:
    """Layers whose gradient norm changed the most over the run."""
    spans = []
    for key, v in series.items():
        if key.startswith("grad_norm/"):
            positive = v[np.isfinite(v) & (v > 0)]
            if positive.size >= 2:
                spans.append((math.log10(positive.max() / positive.min()), key.split("/", 1)[1]))
    return [name for _, name in sorted(spans, reverse=True)[:count]]


def histogram_matrix(run: Run, layer: str, kind: str) -> tuple[np.ndarray, np.ndarray] | None:
    """``(steps, counts)`` of the ``kind`` histogram of ``layer`` (e.g. ``"grad"``), from
    ``run.hist``: ``counts[bin, j]`` (float64) is the count of bin ``bin`` of
    :func:`torchvitals.hist_edges` at ``steps[j]``, in the order the rows are stored. Only
    the lowest rank present is used, so rows merged across ranks (rank -1) win. ``None``
    when the run has no such rows."""
    table = run.hist
    rows = table.filter(
        pc.and_(
            pc.equal(pc.cast(table["layer"], pa.string()), layer),
            pc.equal(pc.cast(table["kind"], pa.string()), kind),
        )
    )
    if rows.num_rows == 0:
        return None
    rows = rows.filter(pc.equal(rows["rank"], pc.min(rows["rank"])))  # merged rows (-1) first
    flat = rows["counts"].combine_chunks().flatten().to_numpy(zero_copy_only=False)
    counts = flat.reshape(rows.num_rows, -1).astype(np.float64).T  # [bins, steps]
    steps = rows["step"].to_numpy()
    return steps, counts
