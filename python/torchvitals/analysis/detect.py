"""``detect_events``: offline event detection on a training run.

Inputs (all arrays 1-D and aligned with ``step``):

``loss``
    the monitored metric (a loss, or with ``higher_is_better=True`` an accuracy/score).
``step``
    increasing step numbers (default ``0..N-1``); events report steps in these units.
``lr``
    learning rate, used to tell ``lr_drop`` from ``kick_in`` (optional).
``**layer_series``
    scalars ``grad_norm`` (global gradient norm), ``loss_scale`` (AMP loss scale), and
    per-layer series keyed ``<metric>/<layer>`` with metric one of

    * ``grad_norm``   - gradient L2 norm of the layer
    * ``weight_norm`` - weight L2 norm
    * ``dead_frac``   - fraction of units that never activate (0..1)
    * ``sat_frac``    - fraction of saturated activations (0..1; bounded activations only)
    * ``large_frac``  - fraction of |x| >= 6 in a linear layer's or norm's output (0..1)
    * ``act_grad_norm`` - L2 norm of the activation gradient
    * ``nonfinite``   - count of NaN/Inf elements (any tensor of the layer)
    * ``nonfinite_act`` / ``nonfinite_grad`` / ``nonfinite_act_grad`` / ``nonfinite_weight``
      - the same per kind of tensor, used to find where the first NaN was made
      (:mod:`torchvitals.analysis.nonfinite`); layer series are expected in forward order.

``metric``
    with a ``run``: the scalar the curve events are computed on (default ``"loss"``; any
    scalar the user logged, e.g. ``"val/loss"`` or, with ``higher_is_better=True``,
    ``"val/acc"``).
``run``
    alternatively a recorded run with pyarrow tables ``run.scalars`` / ``run.layers``
    (docs/schema.md); converted by :func:`torchvitals.analysis.runtables.series_from_run`.
    Explicit keyword arguments override what the run provides.

The result is a list of :class:`~torchvitals.analysis.events.Event`, sorted by step:
curve events (see :mod:`torchvitals.analysis.curve`), layer findings
(:mod:`torchvitals.analysis.layers`), ``nonfinite`` (first NaN/Inf loss or gradient and the
first layer where it appeared) and ``initial_loss``. Curve events of kinds ``kick_in``,
``lr_drop``, ``spike`` and ``divergence`` carry a ranked attribution in ``event.layers``
(:mod:`torchvitals.analysis.attribution`).
"""

from __future__ import annotations

import numpy as np

from .attribution import attribute
from .curve import analyse_curve
from .events import Event
from .layers import aggregate, initial_loss_finding, layer_findings, nonfinite_onsets
from .nonfinite import origin
from .runtables import series_from_run
from .series import as_1d

SCALAR_KEYS = ("grad_norm", "loss_scale")
LAYER_METRICS = (
    "grad_norm",
    "weight_norm",
    "dead_frac",
    "sat_frac",
    "large_frac",
    "act_grad_norm",
    "nonfinite",
    "nonfinite_act",
    "nonfinite_grad",
    "nonfinite_act_grad",
    "nonfinite_weight",
)


def _validate(loss, step, lr, layer_series):
    if loss is None:
        raise ValueError("loss: required (pass loss=... or a run)")
    loss = as_1d("loss", loss)
    n = loss.size
    if n == 0:
        raise ValueError("loss: empty array")
    if step is None:
        step = np.arange(n, dtype=np.int64)
    else:
        step = as_1d("step", step)
        if step.size != n:
            raise ValueError(f"step: length {step.size} does not match loss length {n}")
        if not np.isfinite(step).all():
            raise ValueError("step: contains NaN/Inf")
        step = step.astype(np.int64)
    if lr is not None:
        lr = as_1d("lr", lr)
        if lr.size != n:
            raise ValueError(f"lr: length {lr.size} does not match loss length {n}")
    series = {}
    for key, v in layer_series.items():
        metric, sep, layer = key.partition("/")
        if not sep and key not in SCALAR_KEYS:
            raise ValueError(
                f"{key}: unknown series; expected one of {SCALAR_KEYS} or "
                f"'<metric>/<layer>' with metric in {LAYER_METRICS}"
            )
        if sep and (metric not in LAYER_METRICS or not layer):
            raise ValueError(f"{key}: unknown layer metric {metric!r}; expected {LAYER_METRICS}")
        arr = as_1d(key, v)
        if arr.size != n:
            raise ValueError(f"{key}: length {arr.size} does not match loss length {n}")
        series[key] = arr
    if n > 1 and np.any(np.diff(step) < 0):
        o = np.argsort(step, kind="stable")
        step, loss = step[o], loss[o]
        lr = lr[o] if lr is not None else None
        series = {k: v[o] for k, v in series.items()}
    return loss, step, lr, series


def _nonfinite_event(step, loss, series, curve_events):
    """Merge loss/gradient/layer non-finite sources into one event at the earliest step."""
    sources = []
    for e in curve_events:
        if e.kind == "nonfinite":
            sources.append((e.step, "loss"))
    g = series.get("grad_norm")
    if g is not None and not np.isfinite(g).all():
        sources.append((int(step[np.argmin(np.isfinite(g))]), "grad_norm"))
    onsets = nonfinite_onsets(step, series)
    src = origin(step, series)
    if src is not None:
        sources.append((src["step"], f"layer {src['layer']}"))
    elif onsets:
        sources.append((onsets[0][0], f"layer {onsets[0][1]}"))
    if not sources:
        return None
    at = min(s for s, _ in sources)
    what = ", ".join(f"{w} at step {s}" for s, w in sorted(sources))
    ev = Event("nonfinite", at, at, "critical", f"first non-finite values: {what}", {})
    ev.evidence["first_step"] = float(at)
    if src is not None:
        ev.cause += (
            f"; made in the {src['made_in']} of {src['layer']} "
            f"({src['confidence']} confidence: {src['note']})"
        )
        ev.evidence["origin_layer"] = src["layer"]
        ev.evidence["origin_kind"] = src["kind"]
        ev.evidence["made_in"] = src["made_in"]
        ev.evidence["confidence"] = src["confidence"]
        ev.evidence["first_layer_step"] = float(src["step"])
        ev.layer = src["layer"]
        first = [src["layer"], *[c for c in src["candidates"] if c != src["layer"]]]
        cnt = {lay: c for s, lay, c in onsets}
        rest = [lay for s, lay, c in onsets if lay not in first]
        ev.layers = [(lay, "nonfinite", cnt.get(lay, 0.0), 0) for lay in first] + [
            (lay, "nonfinite", cnt[lay], int(at - s)) for s, lay, c in onsets if lay in rest
        ]
        ev.layers = ev.layers[:10]
    elif onsets:
        ev.layers = [(lay, "nonfinite", cnt, int(at - s)) for s, lay, cnt in onsets[:10]]
        ev.evidence["first_layer_step"] = float(onsets[0][0])
    return ev


GROWTH_KINDS = ("exploding_gradient", "weight_norm_growth")


def _downgrade_growth_while_learning(findings, curve_events, step) -> None:
    """Growth of a layer's gradient or weights that starts with a kick-in is the network
    leaving a plateau (from a small init, say), not an instability: keep it as info."""
    kick_ins = [e.step for e in curve_events if e.kind == "kick_in"]
    if not kick_ins:
        return
    near = max(1, int(0.1 * (step[-1] - step[0])))
    for f in findings:
        relative = abs(f.evidence.get("log10_vs_median_layer", 0.0)) >= 3
        if (
            f.kind in GROWTH_KINDS
            and not relative
            and any(abs(f.step - k) <= near for k in kick_ins)
        ):
            f.severity = "info"
            f.cause += " as the loss kicked in (the layer woke up; not an instability)"


def detect_events(
    run=None,
    *,
    loss=None,
    step=None,
    lr=None,
    metric: str = "loss",
    higher_is_better: bool = False,
    num_classes: int | None = None,
    **layer_series,
) -> list[Event]:
    """Detect training events; see the module docstring for inputs and outputs."""
    if run is not None:
        r_step, r_loss, r_lr, r_series = series_from_run(run, metric)
        if loss is None:
            loss = r_loss
            step = r_step if step is None else step
        if lr is None:
            lr = r_lr
        layer_series = {**r_series, **layer_series}
    loss, step, lr, series = _validate(loss, step, lr, layer_series)
    if metric == "loss":
        metric = "accuracy" if higher_is_better else "loss"
    curve_events, ctx = analyse_curve(step, loss, lr, higher_is_better, metric)
    events = [e for e in curve_events if e.kind != "nonfinite"]
    nf = _nonfinite_event(step, loss, series, curve_events)
    if nf is not None:
        events.append(nf)
    if not higher_is_better and metric == "loss":
        il = initial_loss_finding(step, loss, num_classes)
        if il is not None:
            events.append(il)
    layer_only = {k: v for k, v in series.items() if "/" in k}
    findings = layer_findings(step, layer_only)
    _downgrade_growth_while_learning(findings, events, step)
    events.extend(aggregate(findings))
    block = int(ctx.bounds[1] - ctx.bounds[0]) if ctx.bounds.size > 1 else 1
    attribute(
        events,
        step,
        lr=lr,
        scalars={k: series[k] for k in SCALAR_KEYS if k in series},
        layer_series={k: v for k, v in layer_only.items() if not k.startswith("nonfinite")},
        horizon=max(3, ctx.window * block),
    )
    events.sort(key=lambda e: (e.step, e.kind))
    return events
