"""What the reports show of a run, as plain rows and arrays: the HTML report
(:mod:`torchvitals.report.html`) and the terminal summary (:mod:`torchvitals.report.terminal`)
both render these and compute nothing of their own.

* :func:`event_rows`: one row per event, with the columns :data:`EVENT_COLUMNS`, its layer
  attribution as text (:func:`attribution_text`);
* :func:`worst_layers`: layers ranked by how unhealthy they look anywhere in the run, with
  the columns :data:`WORST_COLUMNS`;
* :func:`histogram_layers`: the layers whose histogram evolution is worth plotting;
* :func:`histogram_matrix`: one layer's histogram over steps, from the run's ``hist`` table;
  :func:`histogram_series`: every layer's, in one pass (signed where ``neg_counts`` is recorded);
* :func:`featured_layers`: the layers named by events and the worst layers;
* :func:`layer_groups`: layers grouped by module path (``blocks.7.*`` -> ``blocks.7``).

``series`` is the dict of ``series_from_run`` (:mod:`torchvitals.analysis.runtables`).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from torchvitals.store.merge import whole_layer_rows
from torchvitals.store.schema import dictionary_codes

from .events import Event
from .runtables import _one_rank

if TYPE_CHECKING:
    from torchvitals.store.reader import Run

__all__ = [
    "EVENT_COLUMNS",
    "WORST_COLUMNS",
    "HistogramSeries",
    "attribution_text",
    "event_rows",
    "featured_layers",
    "histogram_layers",
    "histogram_matrix",
    "histogram_series",
    "layer_groups",
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
    table = whole_layer_rows(run.hist)
    rows = table.filter(
        pc.and_(
            pc.equal(pc.cast(table["layer"], pa.string()), layer),
            pc.equal(pc.cast(table["kind"], pa.string()), kind),
        )
    )
    if rows.num_rows == 0:
        return None
    rows = rows.filter(pc.equal(rows["rank"], pc.min(rows["rank"])))  # merged rows (-1) first
    counts, _ = _list_rows(rows["counts"])
    return rows["step"].to_numpy(), counts.T.astype(np.float64)  # [bins, steps]


def _list_rows(column: pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray]:
    """A list column of equal-length rows as an int64 ``[rows, bins]`` matrix (a view of
    Arrow's buffer when no row is null; null rows hold 0) and the mask of its non-null rows."""
    col = column.combine_chunks()
    valid = np.asarray(col.is_valid().to_numpy(zero_copy_only=False), dtype=bool)
    if valid.all():
        flat = col.flatten().to_numpy(zero_copy_only=False)
        return flat.reshape(len(col), -1), valid
    if not valid.any():  # e.g. neg_counts of a run from before signed histograms
        return np.zeros((len(col), 0), dtype=np.int64), valid
    flat = col.filter(pa.array(valid)).flatten().to_numpy(zero_copy_only=False)
    out = np.zeros((len(col), flat.size // int(valid.sum())), dtype=np.int64)
    out[valid] = flat.reshape(int(valid.sum()), -1)
    return out, valid


@dataclass(frozen=True)
class HistogramSeries:
    """One (layer, kind) histogram over steps: ``counts[bin, j]`` elements in bin ``bin`` of
    :func:`torchvitals.hist_edges` at ``steps[j]``; ``neg[bin, j]`` of them negative, where
    the run records ``neg_counts`` (``None`` when it does not, or some row lacks it)."""

    steps: np.ndarray
    counts: np.ndarray
    neg: np.ndarray | None = None


def histogram_series(run: Run) -> Iterator[tuple[tuple[str, str], HistogramSeries]]:
    """Every ``(layer, kind)`` histogram of ``run.hist`` with its series, in the order the
    pairs first appear, as :func:`histogram_matrix` reads one. The table is read once;
    each series is made (float64) as it is asked for, so a caller that renders and drops
    them holds one at a time besides the table."""
    # A RunScan gives a few hundred steps of each series; a loaded Run has them all.
    scanned = hasattr(run, "histogram_rows")
    table = run.histogram_rows() if scanned else getattr(run, "hist", None)
    if table is None or table.num_rows == 0:
        return
    table = whole_layer_rows(table)  # a shard's part of a parameter is no layer's histogram
    lcodes, lnames = dictionary_codes(table.column("layer"))
    kcodes, knames = dictionary_codes(table.column("kind"))
    keep = np.flatnonzero(_one_rank(table, lcodes, kcodes))  # merged rows (-1) win
    counts, _ = _list_rows(table["counts"])
    neg, neg_valid = (
        _list_rows(table["neg_counts"]) if "neg_counts" in table.column_names else (None, None)
    )
    steps = table["step"].to_numpy()
    key = lcodes.astype(np.int64) * len(knames) + kcodes
    rows = keep[np.argsort(key[keep], kind="stable")]  # stable: stored (step) order kept
    parts = [p for p in np.split(rows, np.flatnonzero(np.diff(key[rows])) + 1) if p.size]
    for part in sorted(parts, key=lambda p: p[0]):
        k = int(key[part[0]])
        signed = neg is not None and bool(neg_valid[part].all())
        yield (
            (lnames[k // len(knames)], knames[k % len(knames)]),
            HistogramSeries(
                steps[part],
                counts[part].T.astype(np.float64),
                neg[part].T.astype(np.float64) if signed else None,
            ),
        )


def featured_layers(
    worst: Sequence[dict[str, object]], events: Sequence[Event], first: Sequence[str] = ()
) -> list[str]:
    """``first``, then the layers the events name (their layer, then their attributed
    layers), then the worst layers (rows of :func:`worst_layers`), each once."""
    names = list(first)
    for ev in events:
        names += [ev.layer] if ev.layer else []
        names += [a for a, *_ in ev.layers if a != "*"]
    names += [str(row["layer"]) for row in worst]
    return list(dict.fromkeys(names))


def layer_groups(names: Sequence[str]) -> dict[str, list[str]]:
    """``names`` grouped by module path, in order of first appearance: a name's group is its
    path up to its first numbered part (``blocks.7.attn.qkv.weight`` -> ``blocks.7``,
    ``0.weight`` -> ``0``), or its first part where none is numbered (``head.bias`` ->
    ``head``)."""
    groups: dict[str, list[str]] = {}
    for name in names:
        parts = name.split(".")
        cut = next((i for i, p in enumerate(parts) if p.isdigit()), 0)
        groups.setdefault(".".join(parts[: cut + 1]), []).append(name)
    return groups
