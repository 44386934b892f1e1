"""Loss-curve events: plateau, kick_in, lr_drop, divergence, spike, outlier.

The curve is first mapped to a log-like "badness" scale (:func:`series.fit_scale`), so a drop
from 0.3 to 0.15 counts like one from 3.0 to 1.5, and accuracy is handled as log error rate.

1. **Excursions** (``excursions.py``, full resolution): each point is compared with the median
   of the preceding five blocks (block size ``ceil(N / 4096)``, i.e. the five preceding points
   for short curves). Points more than ``max(5 sigma, 0.1)`` above that baseline open an
   excursion (sigma: robust, local point-to-point noise). The curve has come back once the
   median of three consecutive points is within ``max(3 sigma, 0.05)`` of the baseline on log
   scale or has undone 97% of the jump on linear scale; the recovery time is taken where 90% is
   undone. One elevated point = ``outlier`` (info); two or more = ``spike`` (warning, critical
   when the recovery takes more than max(10 points, 1% of the run)); never coming back =
   ``divergence``. Later jumps inside an excursion's log-scale tail are aftershocks.
2. **Improvements** (``improvements.py``; coarse curve of at most 2048 block medians, excursions
   interpolated out): with a window ``w = clip(n/40, 3, 64)`` of coarse points, the level after
   the point is compared with the extrapolated trend of the window before it (a rising trend is
   extrapolated flat). A drop that beats the trend by ``max(z sigma_E, 0.02)`` (z = 5, or 3 next
   to a logged LR step), is at least the trend's own change over ``w`` points, sets a new best
   level and is still half there one window later is an improvement event, placed at the knee of
   the transition. With a learning rate series, a sudden LR decrease (by >= 30% in total and >=
   20% in one logged step) near it makes it ``lr_drop``; otherwise it is ``kick_in``. Gradual
   schedules (cosine, linear) never change by 20% in one step, except at their very end.
   Where nothing is found at ``w``, the search is repeated at ``4 w`` for a large (>= x0.9),
   gradual fall from a level, whose onset is where a tenth of the fall is done.
3. **Plateaus** (``plateaus.py``): the stretch before each improvement that stays within a
   quarter of the improvement's depth and moves at most a fifth as fast as the transition, if it
   is at least ``max(5, n/10)`` coarse points long. A kick-in with no plateau before it, right
   after another kick-in, is that kick-in going on: folded into it (one event per phenomenon).
4. **Gradual divergence** (``divergence.py``): the smoothed curve ends well above its minimum
   (by six standard errors of the difference of two medians, and at least log 1.25), is near
   its worst at the end, and the rise does not start inside a spike's recovery. A logged LR
   rise just before a divergence is folded into it.
"""

from __future__ import annotations

import numpy as np

from .context import CurveContext
from .divergence import level_divergence
from .events import Event
from .excursions import find_excursions
from .improvements import find_improvements, merge_continuing
from .lrchanges import lr_events
from .plateaus import find_plateaus
from .series import COARSE_POINTS, block_bounds, block_reduce, diff_noise, fill_nan, fit_scale


def analyse_curve(step, x, lr=None, higher_is_better=False, metric="loss"):
    """Events of one curve; returns ``(events, context)``.

    ``step``, ``x`` (and ``lr`` when given) are aligned 1-D arrays; ``step`` is increasing.
    """
    events: list[Event] = []
    fin = np.isfinite(x)
    if not fin.all():
        k = int(np.argmin(fin))
        events.append(
            Event(
                "nonfinite",
                step[k],
                step[k],
                "critical",
                f"first non-finite {metric} ({x[k]})",
                {"index": float(k), "count": float((~fin).sum())},
                metric=metric,
            )
        )
    index = np.flatnonzero(fin)
    st = step[index]
    xv = x[index]
    lrv = None if lr is None else lr[index]
    scale = fit_scale(xv, higher_is_better)
    y = scale.forward(xv)
    ctx = CurveContext(st, index, y, scale, diff_noise(y))
    if y.size < 3:
        return events, ctx
    exc, mask, div = find_excursions(st, y, scale, metric)
    yc = y.copy()
    yc[mask] = np.nan
    yc = fill_nan(yc)
    ctx.bounds = block_bounds(y.size, COARSE_POINTS)
    ctx.coarse = block_reduce(yc, ctx.bounds, "median")
    ctx.window = int(np.clip(round(ctx.coarse.size / 40), 3, 64))
    stop_at = None
    cmask = block_reduce(mask.astype(np.float64), ctx.bounds, "max") > 0
    if div is None:
        lv = level_divergence(ctx, metric)
        if lv is not None:
            # a rise that starts in an excursion's recovery tail is the spike's business
            w = max(3, ctx.window)
            lo, hi = max(0, lv[1] - w), min(cmask.size, lv[1] + w)
            if not cmask[lo:hi].any():
                div, stop_at = lv
    else:
        stop_at = int(np.searchsorted(st[ctx.bounds[:-1]], div.step, side="right"))
    imps = find_improvements(ctx, lrv, metric, stop_at, cmask)
    if div is not None:
        exc = [e for e in exc if e.step < div.step]
        events.append(div)
    events.extend(exc)
    plateaus = find_plateaus(ctx, imps, metric, {id(e): end for e, _, _, end in imps})
    imps = merge_continuing(imps, plateaus, scale.kind != "asinh")
    lrs = lr_events(step, y, index, lr, scale, metric) if lr is not None else []
    kept = _merge_lr(lrs, [t[0] for t in imps], step)
    if div is not None:
        lrs = _fold_lr_rise(lrs, div, step)
    events.extend(lrs)
    events.extend(e for e in (t[0] for t in imps) if id(e) in kept)
    events.extend(plateaus)
    return events, ctx


def _near_lr_change(ev: Event, at: int, step) -> bool:
    """Whether ``at`` is within the loss-response window of the LR change ``ev``."""
    s_c = ev.evidence["lr_change_step"]
    span = max(1, int(step[-1] - step[0]))
    win = max(ev.evidence.get("window_points", 5), 3) * span / max(1, step.size - 1)
    return s_c - 0.5 * win <= at <= s_c + win


def _fold_lr_rise(lrs, div: Event, step) -> list[Event]:
    """One event per phenomenon: a divergence that starts right after an LR rise is what
    the rise did; the rise is folded into it (its LR numbers in the divergence's evidence,
    named in its cause) instead of a second row."""
    out = []
    for ev in lrs:
        if (
            ev.kind == "lr_rise"
            and "lr_change_step" in ev.evidence
            and _near_lr_change(ev, div.step, step)
        ):
            e = ev.evidence
            for k in ("lr_before", "lr_after", "lr_ratio", "lr_change_step"):
                div.evidence[k] = e[k]
            div.cause += f" after the LR rose x{e['lr_ratio']:.3g} at step {ev.step}"
            continue
        out.append(ev)
    return out


def _merge_lr(lrs, imps, step) -> set[int]:
    """One event per phenomenon: an improvement that is the response to a logged LR drop
    is folded into that ``lr_drop`` (anchored at the LR change). Returns the ids of the
    improvements that stay events of their own."""
    kept = {id(e) for e in imps}
    for imp in imps:
        best = None
        for ev in lrs:
            if ev.kind != "lr_drop":
                continue
            s_c = ev.evidence["lr_change_step"]
            same = imp.evidence.get("lr_change_step") == s_c
            close = same or _near_lr_change(ev, imp.step, step)
            if close and (best is None or abs(imp.step - s_c) < abs(best.step - s_c)):
                best = ev
        if best is None:
            continue
        kept.discard(id(imp))
        e = best.evidence
        e["curve_log_drop"] = imp.evidence.get("log_drop", float("nan"))
        e["curve_onset_step"] = float(imp.step)
        best.end_step = max(best.end_step, imp.end_step)
        if e.get("confidence") == "none":
            e["confidence"] = "medium"
            best.cause = (
                f"LR x{e['lr_ratio']:.3g} at step {best.step}: {imp.metric} improved "
                f"x{imp.evidence.get('ratio', float('nan')):.3g} (found on the curve)"
            )
    return kept
