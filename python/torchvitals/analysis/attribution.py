"""Which layers and metrics changed first, and by how much, around an event.

For every ``kick_in``, ``lr_drop``, ``spike`` and ``divergence`` the candidate series (the
LR, the global gradient norm, the loss scale, and every per-layer series) are compared with
their own level just before the event: the baseline is the median over ``[t0 - 4H, t0 - H)``
and the first point in ``[t0 - H, t0 + H]`` that leaves it by more than
``max(4 sigma, floor)`` marks the change (``H`` is the event's own time scale: its
transition or recovery length, at least 3 points). Norms, LR and loss scale are compared on
log scale (floor: x1.5), fractions as differences (floor: 0.05 absolute).

``lr_drop`` / ``lr_rise`` are anchored at the LR change itself: the baseline is the median
over ``[t0 - 4H, t0)`` and changes are looked for in ``[t0, t0 + H]`` after it, with ``H``
three response times of the loss (at least 3 points, at least the event's own length).

The result is a list of ``(layer, metric, change, lead_steps)`` ranked by how early the
change happened (largest lead first), then by its size relative to the threshold. Global
series use the layer name ``"*"``.
"""

from __future__ import annotations

import math

import numpy as np

from .events import ATTRIBUTED_KINDS, Event
from .series import block_bounds, block_reduce, diff_noise

LOG_FLOOR = math.log(1.5)
FRAC_FLOOR = 0.05
MAX_LOCAL = 1024
TOP = 10

_LOG_METRICS = {"grad_norm", "weight_norm", "lr", "loss_scale", "act_grad_norm"}
_FRAC_METRICS = {"dead_frac", "sat_frac", "large_frac"}


def _candidates(lr, scalars: dict, layer_series: dict):
    if lr is not None:
        yield "*", "lr", lr
    for name, v in scalars.items():
        yield "*", name, v
    for key, v in layer_series.items():
        metric, _, layer = key.partition("/")
        if layer:
            yield layer, metric, v


def _local(v: np.ndarray, a: int, b: int):
    seg = np.asarray(v[a:b], dtype=np.float64)
    if seg.size > MAX_LOCAL:
        bounds = block_bounds(seg.size, MAX_LOCAL)
        return block_reduce(seg, bounds, "median"), bounds
    return seg, None


def _change(step, v, metric, i0, H, after=False):
    """(change, lead_steps, score) or None. ``after``: only look at ``[i0, i0 + H]``."""
    n = v.size
    a = max(0, i0 - 4 * H)
    hi = min(n, i0 + H + 1)
    if after:
        H = 0  # baseline [i0 - 4H, i0), search [i0, i0 + H]
    seg, bnd = _local(v, a, hi)
    st = step[a:hi] if bnd is None else step[a:hi][bnd[:-1]]
    if metric in _LOG_METRICS:
        with np.errstate(divide="ignore", invalid="ignore"):
            seg = np.log(np.where(seg > 0, seg, np.nan))
        floor = LOG_FLOOR
    elif metric in _FRAC_METRICS:
        floor = FRAC_FLOOR
    elif metric == "nonfinite":
        floor = 0.5
    else:
        return None
    rel_b = max(1, (i0 - H) - a) if bnd is None else max(1, int(np.searchsorted(bnd, i0 - H - a)))
    base_seg = seg[:rel_b]
    base_seg = base_seg[np.isfinite(base_seg)]
    if base_seg.size == 0:
        return None
    base = float(np.median(base_seg))
    thr = max(4.0 * diff_noise(base_seg) if base_seg.size >= 5 else 0.0, floor)
    dev = seg[rel_b:] - base
    if metric == "nonfinite":
        dev = np.where(np.isfinite(seg[rel_b:]), seg[rel_b:], 0.0)
    big = np.isfinite(dev) & (np.abs(dev) > thr)
    if not big.any():
        return None
    # direction of the largest deviation, then the first time it crossed the threshold
    sgn = np.sign(dev[np.nanargmax(np.where(big, np.abs(dev), -np.inf))])
    hit = np.flatnonzero(big & (np.sign(dev) == sgn))
    t = int(hit[0])
    change = float(sgn * np.max(np.abs(dev[hit])))
    lead = int(step[i0] - st[rel_b + t])
    return change, lead, abs(change) / thr


def _phrase(layer, metric, change, lead):
    when = f"{lead} steps before" if lead > 0 else ("at onset" if lead == 0 else f"{-lead} after")
    where = "" if layer == "*" else f" in {layer}"
    if metric == "lr":
        return f"LR {'decreased' if change < 0 else 'increased'} x{math.exp(change):.3g} ({when})"
    if metric == "loss_scale" and change < 0:
        return f"loss-scale collapse x{math.exp(change):.3g} ({when})"
    if metric in ("grad_norm", "act_grad_norm"):
        word = "surge" if change > 0 else "drop"
        return f"gradient-norm {word} x{math.exp(change):.3g}{where} ({when})"
    if metric == "sat_frac":
        word = "falling" if change < 0 else "rising"
        return f"saturation {word} by {abs(change):.2f}{where} ({when})"
    if metric == "dead_frac":
        word = "dead units reviving" if change < 0 else "units dying"
        return f"{word} ({abs(change):.2f}){where} ({when})"
    if metric == "weight_norm":
        return f"weight norm x{math.exp(change):.3g}{where} ({when})"
    if metric == "nonfinite":
        return f"non-finite values{where} ({when})"
    return f"{metric}{where} changed {change:+.3g} ({when})"


def attribute(
    events: list[Event],
    step: np.ndarray,
    *,
    lr: np.ndarray | None = None,
    scalars: dict[str, np.ndarray] | None = None,
    layer_series: dict[str, np.ndarray] | None = None,
    horizon: int = 3,
) -> None:
    """Fill ``event.layers`` (and extend ``event.cause``) in place.

    ``horizon`` is the default time scale in points (the detector passes its improvement
    window for coarse events); a spike uses its own recovery length.
    """
    scalars = scalars or {}
    layer_series = layer_series or {}
    if step.size == 0:
        return
    cands = list(_candidates(lr, scalars, layer_series))
    if not cands:
        return
    for ev in events:
        if ev.kind not in ATTRIBUTED_KINDS:
            continue
        anchored = ev.kind in ("lr_drop", "lr_rise") and "lr_change_step" in ev.evidence
        s0 = ev.evidence["lr_change_step"] if anchored else ev.step
        i0 = int(np.searchsorted(step, s0))
        i0 = min(max(i0, 0), step.size - 1)
        if anchored:
            resp = ev.evidence.get("response_points", 0.0)
            own = int(np.searchsorted(step, ev.end_step)) - i0
            H = max(3, int(3 * resp), own)
        elif ev.kind == "spike":
            H = max(3, int(ev.evidence.get("recovery_points", 3)))
        else:
            H = max(3, horizon)
        ranked = []
        for layer, metric, v in cands:
            r = _change(step, np.asarray(v), metric, i0, H, after=anchored)
            if r is not None:
                ranked.append((layer, metric, r[0], r[1], r[2]))
        ranked.sort(key=lambda t: (-t[3], -t[4]))
        ev.layers = [(a, b, c, d) for a, b, c, d, _ in ranked[:TOP]]
        if ranked:
            phrases = [_phrase(a, b, c, d) for a, b, c, d, _ in ranked[:3]]
            ev.cause = f"{ev.cause}; first changes: " + "; ".join(phrases)
