"""Per-layer findings from layer series (see :mod:`torchvitals.analysis.detect` for keys).

Each finding is computed on the block-median coarse version of the series, so the cost is
one O(N) pass per series. Thresholds:

* ``dead_units``: dead fraction >= 0.5 at the end (critical >= 0.9), or grown by >= 0.25.
* ``saturation``: saturated fraction >= 0.25 at the end (critical >= 0.6), or grown by >= 0.2.
* ``vanishing_gradient`` / ``exploding_gradient``: a layer's gradient norm, relative to the
  median over layers, below 1e-3 (above 1e3) for the last half of the run; or its own
  gradient norm fallen below 1e-3x (risen above 1e2x) its early level.
* ``large_activations``: fraction of elements with |x| >= 6 in the output of a linear layer or
  norm (``large_frac``, schema version 2) >= 0.1 at the end (warning >= 0.5), or grown by
  >= 0.2: large pre-activations, not saturation (only bounded activations saturate).
* ``weight_norm_growth``: weight norm grown >= 4x (critical >= 20x) since the start.

:func:`aggregate` folds the findings of one kind into one event per phenomenon: the layers
it involves are listed in ``event.layers`` (most severe, then largest, first) with a count
in ``evidence["count"]``; info rows are a phenomenon of their own.
* ``initial_loss``: first finite loss outside [0.5, 1.5] x ln(num_classes).
"""

from __future__ import annotations

import math
import warnings

import numpy as np

from .events import Event
from .series import block_bounds, block_reduce

DEAD_END, DEAD_CRIT, DEAD_GROW = 0.5, 0.9, 0.25
SAT_END, SAT_CRIT, SAT_GROW = 0.25, 0.6, 0.2
GRAD_REL_LO, GRAD_REL_HI = 1e-3, 1e3
GRAD_SELF_LO, GRAD_SELF_HI = 1e-3, 1e2
WN_GROW, WN_CRIT = 4.0, 20.0
LARGE_END, LARGE_WARN, LARGE_GROW = 0.1, 0.5, 0.2


def _ends(c: np.ndarray) -> tuple[float, float]:
    ok = c[np.isfinite(c)]
    if ok.size == 0:
        return math.nan, math.nan
    k = max(1, ok.size // 10)
    return float(np.median(ok[:k])), float(np.median(ok[-k:]))


def _first_above(c, cstep, thr) -> int:
    idx = np.flatnonzero(np.isfinite(c) & (c >= thr))
    return int(cstep[idx[0]]) if idx.size else int(cstep[-1])


def _fraction_finding(
    kind, layer, c, cstep, end_thr, crit_thr, grow_thr, what, warn_thr=None, metric=None
):
    start, end = _ends(c)
    if not math.isfinite(end):
        return None
    grown = end - start
    if end < end_thr and grown < grow_thr:
        return None
    sev = "critical" if end >= crit_thr else "warning"
    if warn_thr is not None and end < warn_thr:
        sev = "info"
    at = _first_above(c, cstep, start + 0.5 * grown if grown >= grow_thr else end_thr)
    cause = f"{what.format(f'{end:.0%}')} {layer}" + (
        f" (up from {start:.0%})" if grown >= grow_thr else ""
    )
    ev = {"start_frac": start, "end_frac": end, "growth": grown}
    return Event(kind, at, int(cstep[-1]), sev, cause, ev, layer=layer, metric=metric or kind)


def layer_findings(step: np.ndarray, series: dict[str, np.ndarray]) -> list[Event]:
    """Layer findings from ``series`` (``{"grad_norm/<layer>": array, ...}``)."""
    out: list[Event] = []
    n = step.size
    if n == 0:
        return out
    bounds = block_bounds(n, 1024)
    cstep = step[bounds[:-1]]
    coarse = {
        k: block_reduce(np.asarray(v, np.float64), bounds, "median") for k, v in series.items()
    }
    grads = {}
    for key, c in coarse.items():
        metric, _, layer = key.partition("/")
        if not layer:
            continue
        if metric == "dead_frac":
            ev = _fraction_finding(
                "dead_units",
                layer,
                c,
                cstep,
                DEAD_END,
                DEAD_CRIT,
                DEAD_GROW,
                "dead: {} of units in",
            )
            if ev:
                out.append(ev)
        elif metric == "sat_frac":
            ev = _fraction_finding(
                "saturation",
                layer,
                c,
                cstep,
                SAT_END,
                SAT_CRIT,
                SAT_GROW,
                "saturated: {} of activations in",
            )
            if ev:
                out.append(ev)
        elif metric == "large_frac":
            ev = _fraction_finding(
                "large_activations",
                layer,
                c,
                cstep,
                LARGE_END,
                2.0,
                LARGE_GROW,
                "large activations (|x| >= 6): {} of the output of",
                warn_thr=LARGE_WARN,
                metric="large_frac",
            )
            if ev:
                out.append(ev)
        elif metric == "weight_norm":
            start, end = _ends(c)
            if start > 0 and end / start >= WN_GROW:
                ratio = end / start
                out.append(
                    Event(
                        "weight_norm_growth",
                        _first_above(c, cstep, start * math.sqrt(ratio)),
                        int(cstep[-1]),
                        "critical" if ratio >= WN_CRIT else "warning",
                        f"weight norm of {layer} grew x{ratio:.3g}",
                        {"start": start, "end": end, "ratio": ratio},
                        layer=layer,
                        metric="weight_norm",
                    )
                )
        elif metric == "grad_norm":
            grads[layer] = c
    if grads:
        out.extend(_gradient_findings(grads, cstep))
    return out


def _gradient_findings(grads: dict[str, np.ndarray], cstep: np.ndarray) -> list[Event]:
    # Steps where every layer's gradient is NaN (a NaN run) give NaN medians, as meant.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "All-NaN slice", RuntimeWarning)
        return _gradient_findings_of(grads, cstep)


def _gradient_findings_of(grads: dict[str, np.ndarray], cstep: np.ndarray) -> list[Event]:
    out = []
    names = list(grads)
    mat = np.vstack([grads[k] for k in names])  # layers x time
    with np.errstate(divide="ignore", invalid="ignore"):
        lg = np.log10(np.where(mat > 0, mat, np.nan))
    m = mat.shape[1]
    half = slice(m // 2, m)
    med_t = np.nanmedian(lg, axis=0) if len(names) >= 3 else None
    for j, layer in enumerate(names):
        row = lg[j]
        ok = np.isfinite(row)
        if ok.sum() < 2:
            if np.all(mat[j][np.isfinite(mat[j])] == 0) and np.isfinite(mat[j]).any():
                out.append(
                    Event(
                        "vanishing_gradient",
                        int(cstep[0]),
                        int(cstep[-1]),
                        "critical",
                        f"gradient of {layer} is exactly zero",
                        {"grad_norm": 0.0},
                        layer=layer,
                        metric="grad_norm",
                    )
                )
            continue
        early = float(np.nanmedian(row[: max(1, m // 10)]))
        late = float(np.nanmedian(row[half]))
        rel = float(np.nanmedian(row[half] - med_t[half])) if med_t is not None else 0.0
        kind = None
        if med_t is not None and rel <= math.log10(GRAD_REL_LO):
            kind, why = "vanishing_gradient", f"{10**rel:.2g}x the median layer"
        elif med_t is not None and rel >= math.log10(GRAD_REL_HI):
            kind, why = "exploding_gradient", f"{10**rel:.2g}x the median layer"
        elif late - early <= math.log10(GRAD_SELF_LO):
            kind, why = "vanishing_gradient", f"fell x{10 ** (late - early):.2g} since the start"
        elif late - early >= math.log10(GRAD_SELF_HI):
            kind, why = "exploding_gradient", f"grew x{10 ** (late - early):.2g} since the start"
        if kind is None:
            continue
        mid = 0.5 * (early + late)
        cross = np.flatnonzero(ok & ((row <= mid) if late < early else (row >= mid)))
        at = int(cstep[cross[0]]) if cross.size and abs(late - early) > 1 else int(cstep[0])
        out.append(
            Event(
                kind,
                at,
                int(cstep[-1]),
                "critical" if abs(rel) >= 4 or abs(late - early) >= 4 else "warning",
                f"gradient norm of {layer} {why}",
                {"log10_vs_median_layer": rel, "log10_change": late - early},
                layer=layer,
                metric="grad_norm",
            )
        )
    return out


def initial_loss_finding(step, loss, num_classes) -> Event | None:
    """``initial_loss`` when the first finite loss is far from ln(num_classes)."""
    if num_classes is None or num_classes < 2:
        return None
    fin = np.flatnonzero(np.isfinite(loss))
    if fin.size == 0:
        return None
    first = float(loss[fin[0]])
    ref = math.log(num_classes)
    ratio = first / ref
    if 0.5 <= ratio <= 1.5:
        return None
    return Event(
        "initial_loss",
        int(step[fin[0]]),
        int(step[fin[0]]),
        "critical" if ratio > 3 or ratio < 0.2 else "warning",
        f"first loss {first:.4g} vs ln({num_classes}) = {ref:.4g} expected for a uniform "
        "prediction: check initialisation / output scaling / labels",
        {"first_loss": first, "expected": ref, "ratio": ratio},
        metric="loss",
    )


def nonfinite_onsets(step, series: dict[str, np.ndarray]) -> list[tuple[int, str, float]]:
    """``(step, layer, count)`` of each layer's first non-zero ``nonfinite/<layer>`` count,
    earliest first (ties keep the series' order, the forward order of the layers)."""
    onsets = []
    for key, v in series.items():
        metric, _, layer = key.partition("/")
        if metric != "nonfinite" or not layer:
            continue
        idx = np.flatnonzero(np.asarray(v) > 0)
        if idx.size:
            onsets.append((int(step[idx[0]]), layer, float(v[idx[0]])))
    onsets.sort(key=lambda r: r[0])
    return onsets


_SEV = {"info": 0, "warning": 1, "critical": 2}


def finding_size(f: Event) -> float:
    """How large a layer finding is, in its own units (for ranking layers within a kind)."""
    e = f.evidence
    if "end_frac" in e:
        return float(e["end_frac"])
    if "ratio" in e:
        return abs(math.log(max(float(e["ratio"]), 1e-300)))
    if "log10_change" in e:
        return max(abs(float(e["log10_change"])), abs(float(e.get("log10_vs_median_layer", 0))))
    return 0.0


def aggregate(findings: list[Event], top: int = 3) -> list[Event]:
    """One event per kind (and per info / warning-or-worse): the layers it involves in
    ``event.layers`` as ``(layer, metric, size, lead)`` (lead: steps between the layer's own
    onset and the event's), ``evidence["count"]`` and per-severity counts."""
    groups: dict[tuple[str, bool], list[Event]] = {}
    for f in findings:
        groups.setdefault((f.kind, f.severity == "info"), []).append(f)
    out = []
    for (kind, _), fs in groups.items():
        fs.sort(key=lambda f: (-_SEV[f.severity], -finding_size(f)))
        if len(fs) == 1:
            f = fs[0]
            f.evidence["count"] = 1.0
            if f.layer:
                f.layers = [(f.layer, f.metric, finding_size(f), 0)]
            out.append(f)
            continue
        head = fs[0]
        at = min(f.step for f in fs)
        names = [f.layer for f in fs if f.layer]
        shown = ", ".join(names[:top]) + (
            f" and {len(names) - top} more" if len(names) > top else ""
        )
        ev = dict(head.evidence)
        ev["count"] = float(len(fs))
        for sev in ("critical", "warning", "info"):
            k = sum(f.severity == sev for f in fs)
            if k:
                ev[f"count_{sev}"] = float(k)
        what = kind.replace("_", " ")
        out.append(
            Event(
                kind,
                at,
                max(f.end_step for f in fs),
                head.severity,
                f"{what} in {len(fs)} layers ({shown}); worst: {head.cause}",
                ev,
                layers=[(f.layer or "*", f.metric, finding_size(f), int(at - f.step)) for f in fs],
                layer=head.layer,
                metric=head.metric,
            )
        )
    return out
