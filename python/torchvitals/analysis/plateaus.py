"""Plateaus: the flat stretch before each improvement.

A plateau stays within a quarter of the improvement's depth, moves at most a fifth as fast
as the transition, and is at least ``max(5, n/10)`` coarse points long.
"""

from __future__ import annotations

import math

import numpy as np

from .context import CurveContext
from .events import Event
from .series import diff_noise, rolling_median

# Thresholds on the log-badness scale; chosen once on the development set, shared by every
# curve.
PLATEAU_BAND = 0.25
PLATEAU_PACE = 0.2


def find_plateaus(ctx: CurveContext, imps, metric: str, ev_end):
    c = ctx.coarse
    m = c.size
    if m < 8:
        return []
    # smoothed over a quarter window: one noisy point must not end a plateau on a long curve
    width = max(3, (ctx.window // 4) | 1)
    c_sm = rolling_median(c, width)
    sig_c = diff_noise(c)
    sig_sm = sig_c / math.sqrt(width)
    min_len = max(5, round(m / 10))
    events = []
    prev_end = 0
    for ev, on, eff, _ in imps:
        k = on - 1
        if k <= prev_end:
            prev_end = on
            continue
        # the level just before the knee: a median, the knee point itself may be noise
        level = float(np.median(c[max(prev_end, k - ctx.window // 2) : k + 1]))
        # depth of the improvement shortly after (a slow kick-in goes much further than
        # the window-scale drop)
        depth = max(eff, level - float(np.min(c_sm[on : min(m, on + 4 * ctx.window + 1)])))
        band = max(3 * sig_c, PLATEAU_BAND * depth)
        # the transition's pace; a plateau's own pace is well below it
        e_end = max(ev_end[id(ev)], on + 1)
        pace = max(eff / (e_end - on + 1), float(np.max(-np.diff(c_sm[on - 1 : e_end + 1]))))
        lw = max(2, ctx.window // 2)
        j = k
        while j - 1 >= prev_end and abs(c_sm[j - 1] - level) <= band:
            a = max(0, j - 1 - lw)
            # a fall faster than a fifth of the transition's pace, beyond what the noise
            # of two smoothed points can make
            if c_sm[a] - c_sm[j - 1] > PLATEAU_PACE * pace * max(1, j - 1 - a) + 2 * sig_sm:
                break
            j -= 1
        if k - j + 1 >= min_len:
            s0 = ctx.step[int(ctx.bounds[j])]
            s1 = ctx.step[int(ctx.bounds[k + 1]) - 1]
            first = j <= max(1, m // 50)
            events.append(
                Event(
                    "plateau",
                    s0,
                    s1,
                    "warning" if first else "info",
                    f"{metric} flat for {s1 - s0} steps before a {ev.kind}"
                    + (" (slow start)" if first else ""),
                    {
                        "length_steps": float(s1 - s0),
                        "drift": float(c_sm[j] - level),
                        "band": float(band),
                        "followed_by_step": float(ev.step),
                    },
                    metric=metric,
                )
            )
        prev_end = on
    return events
