"""Gradual divergence: the smoothed curve ends well above its minimum.

The rise (the median of the last twentieth against the lowest rolling median of a window)
must be at least ``max(6 standard errors, log 1.25)``, the curve near its worst at the end.
"""

from __future__ import annotations

import math

import numpy as np

from .context import CurveContext
from .events import Event
from .series import diff_noise, rolling_median

# Thresholds on the log-badness scale; chosen once on the development set, shared by every
# curve.
DIV_MIN = math.log(1.25)


def level_divergence(ctx: CurveContext, metric: str):
    c = ctx.coarse
    m = c.size
    if m < 8:
        return None
    w = max(3, ctx.window) | 1
    s = rolling_median(c, w)
    tail = max(3, m // 20)
    imin = int(np.argmin(s[: m - tail]))
    final = float(np.median(c[m - tail :]))
    rise = final - float(s[imin])
    # six standard errors of the difference of two medians (of ``w`` and ``tail`` points):
    # a level shift, not one noisy point
    se = 1.2533 * diff_noise(c) * math.sqrt(1.0 / w + 1.0 / tail)
    if rise < max(6 * se, DIV_MIN):
        return None
    lin = ctx.scale.linear
    lmin = float(lin(s[imin]))
    lmax = float(np.max(lin(s[imin:])))
    if lin(final) - lmin < 0.5 * (lmax - lmin):
        return None
    below = np.flatnonzero(s[: m - tail] <= s[imin] + 0.2 * rise)
    on = int(below[-1]) + 1 if below.size else imin + 1
    on = min(on, m - 1)
    ev = {
        "best_level": lmin,
        "end_level": float(lin(final)),
        "log_rise": rise,
    }
    return (
        Event(
            "divergence",
            ctx.step[int(ctx.bounds[on])],
            ctx.step[-1],
            "critical",
            f"{metric} rose x{math.exp(rise):.3g} above its best and stayed there",
            ev,
            metric=metric,
        ),
        on,
    )
