"""Loss-curve events: plateau, kick_in, lr_drop, divergence, spike, outlier.

The curve is first mapped to a log-like "badness" scale (:func:`series.fit_scale`), so a drop
from 0.3 to 0.15 counts like one from 3.0 to 1.5, and accuracy is handled as log error rate.

1. **Excursions** (full resolution): each point is compared with the median of the preceding
   five blocks (block size ``ceil(N / 4096)``, i.e. the five preceding points for short
   curves). Points more than ``max(5 sigma, 0.1)`` above that baseline open an excursion
   (sigma: robust, local point-to-point noise). The curve has come back once the median of
   three consecutive points is within ``max(3 sigma, 0.05)`` of the baseline on log scale or
   has undone 97% of the jump on linear scale; the recovery time is taken where 90% is
   undone. One elevated point = ``outlier`` (info); two or more = ``spike`` (warning,
   critical when the recovery takes more than max(10 points, 1% of the run)); never coming
   back = ``divergence``. Later jumps inside an excursion's log-scale tail are aftershocks.
2. **Improvements** (coarse curve of at most 2048 block medians, excursions interpolated
   out): with a window ``w = clip(n/40, 3, 64)`` of coarse points, the level after the point
   is compared with the extrapolated trend of the window before it (a rising trend is
   extrapolated flat). A drop that beats the trend by ``max(z sigma_E, 0.02)`` (z = 5, or 3
   next to a logged LR step), is at least the trend's own change over ``w`` points, sets a
   new best level and is still half there one window later is an improvement event, placed
   at the knee of the transition. With a learning rate series, a sudden LR decrease (by
   >= 30% in total and >= 20% in one logged step) near it makes it ``lr_drop``; otherwise it
   is ``kick_in``. Gradual schedules (cosine, linear) never change by 20% in one step,
   except at their very end.
3. **Plateaus**: the stretch before each improvement that stays within a quarter of the
   improvement's depth and moves at most a fifth as fast as the transition, if it is at
   least ``max(5, n/10)`` coarse points long.
4. **Gradual divergence**: the smoothed curve ends well above its minimum (by
   ``max(6 sigma, log 1.25)``), is near its worst at the end, and the rise does not start
   inside a spike's recovery.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from .events import Event
from .series import (
    COARSE_POINTS,
    Scale,
    block_bounds,
    block_reduce,
    diff_noise,
    fill_nan,
    fit_scale,
    robust_sigma,
    rolling_median,
    trailing_median,
    window_fits,
)

# Thresholds, all on the log-badness scale; chosen once on the development set, shared by
# every curve.
K_HI = 5.0  # excursion opens at K_HI robust sigmas above the baseline ...
MIN_SPIKE = 0.10  # ... and at least 10% (log 1.105)
K_LO = 3.0  # excursion is over within K_LO sigmas ...
MIN_BACK = 0.05  # ... or 5%
LIN_RECOVERY = 0.90
LIN_BACK = 0.97  # or once 95% of the jump is undone on linear scale
BASE_BLOCKS = 5  # baseline = median of this many preceding blocks
BASE_MIN = 3  # ... and at least this many
SPIKE_BLOCKS = 4096  # block resolution for the excursion baseline
Z_IMP = 5.0
Z_LR = 3.0
MIN_EFFECT = 0.02
SUDDEN = 1.0
LR_TOTAL = 0.7
LR_STEP = 0.8
DIV_MIN = math.log(1.25)
PLATEAU_BAND = 0.25
PLATEAU_PACE = 0.2


@dataclass
class CurveContext:
    """What the detectors learned about the curve, reused by attribution."""

    step: np.ndarray  # steps of the finite points
    index: np.ndarray  # their indices in the caller's arrays
    y: np.ndarray  # log-badness
    scale: Scale
    sigma: float
    bounds: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    window: int = 0  # improvement window, coarse points
    coarse: np.ndarray = field(default_factory=lambda: np.zeros(0))


def _median3_from(seg: np.ndarray) -> np.ndarray:
    """m[j] = median(seg[j], seg[j+1], seg[j+2]) (shorter at the end)."""
    n = seg.size
    if n >= 3:
        a, b, c = seg[:-2], seg[1:-1], seg[2:]
        m = np.maximum(np.minimum(a, b), np.minimum(np.maximum(a, b), c))
        tail = [np.median(seg[n - 2 :]), seg[n - 1]]
        return np.concatenate([m, tail])
    if n == 2:
        return np.array([0.5 * (seg[0] + seg[1]), seg[1]])
    return seg.copy()


def _recovery(y, i, b0, thr_lo, lin):
    """End of the excursion that starts at ``i``.

    Returns ``(e_lin, e_log, peak_idx, peak_lin)``. The curve counts as having come back
    once the median of three consecutive points is within ``thr_lo`` of the baseline on log
    scale, or has undone 97% of the jump on linear scale (:data:`LIN_BACK`); ``e_lin`` is
    then the first point where 90% was undone (:data:`LIN_RECOVERY`, the recovery time) and
    ``e_log`` the first point back on log scale (``None`` if that never happens). When the
    curve never comes back, ``e_lin`` is ``None`` (divergence).
    """
    n = y.size
    lin_b0 = float(lin(b0))
    peak_idx, peak_lin = i, float(lin(y[i]))
    start, chunk = i + 1, 16
    e90 = None
    while start < n:
        stop = min(n, start + chunk)
        seg = y[start : min(n, stop + 2)]
        lseg = lin(seg)[: stop - start]
        run_pk = np.maximum.accumulate(np.concatenate([[peak_lin], lseg]))[1:]
        m3 = _median3_from(seg)[: stop - start]
        lm3 = lin(m3) - lin_b0
        ok_log = m3 <= b0 + thr_lo
        ok90 = ok_log | (lm3 <= (1 - LIN_RECOVERY) * (run_pk - lin_b0))
        ok97 = ok_log | (lm3 <= (1 - LIN_BACK) * (run_pk - lin_b0))
        h97 = np.flatnonzero(ok97)
        lim = int(h97[0]) + 1 if h97.size else stop - start
        if e90 is None:
            h90 = np.flatnonzero(ok90[:lim])
            if h90.size:
                e90 = start + int(h90[0])
        pk = lseg[: (e90 - start) if e90 is not None and e90 < stop else lim]
        if pk.size and pk.max() > peak_lin:
            peak_lin = float(pk.max())
            peak_idx = start + int(np.argmax(pk))
        if h97.size:
            hl = np.flatnonzero(ok_log)
            e_log = start + int(hl[0]) if hl.size else None
            return e90, e_log, peak_idx, peak_lin
        start = stop
        chunk *= 4
    return None, None, peak_idx, peak_lin


def _excursions(step, y, scale: Scale, metric: str):
    n = y.size
    events: list[Event] = []
    mask = np.zeros(n, dtype=bool)
    if n < 3:
        return events, mask, None
    bounds = block_bounds(n, SPIKE_BLOCKS)
    bm = block_reduce(y, bounds, "median")
    pre = trailing_median(bm, BASE_BLOCKS)
    hist = min(BASE_MIN, max(1, n // 4))
    pre[: min(hist, pre.size)] = np.nan  # need a few points of history
    base = np.repeat(pre, np.diff(bounds))
    r = y - base
    valid = np.isfinite(r)
    if valid.sum() >= 10:
        sig = robust_sigma(r[valid])
        # local noise: rolling median of |first differences| over ~2% of the curve
        ad = np.abs(np.diff(y, prepend=y[0]))
        ab = block_reduce(ad, bounds, "median")
        width = max(21, (bm.size // 25) | 1)
        loc = (1.4826 / math.sqrt(2.0)) * rolling_median(ab, width)
        sig_pt = np.maximum(sig, np.repeat(loc, np.diff(bounds)))
    else:
        sig = 0.0
        sig_pt = np.zeros(n)
    thr_hi = np.maximum(K_HI * sig_pt, MIN_SPIKE)
    float(np.median(thr_hi))
    thr_lo_pt = np.maximum(K_LO * sig_pt, MIN_BACK)
    cand = np.flatnonzero(valid & (r > thr_hi))
    pos = 0
    tail_end, tail_level = 0, -np.inf
    divergence = None
    lin = scale.linear
    for i in cand:
        if i < pos:
            continue
        if i < tail_end and (y[i] < tail_level or y[i] - y[i - 1] <= thr_hi[i]):
            continue  # aftershock / log-scale tail of the previous excursion
        b0 = float(base[i])
        thr_lo = float(thr_lo_pt[i])
        lin_b0 = float(lin(b0))
        e_lin, e_log, peak_idx, peak_lin = _recovery(y, i, b0, thr_lo, lin)
        on = i
        while on - 1 >= pos and on > i - 50 and y[on - 1] - b0 > thr_lo:
            on -= 1
        excess = float(y[peak_idx] - b0)
        ev = {
            "baseline": lin_b0,
            "peak": peak_lin,
            "peak_step": float(step[peak_idx]),
            "log_jump": excess,
            "ratio": float(math.exp(excess)) if scale.kind != "asinh" else float("nan"),
            "sigma": float(sig_pt[i]),
        }
        if e_lin is None:
            after = n - 1 - peak_idx
            if after >= 1:
                tail = y[peak_idx + 1 :]
                ev["end_level"] = float(lin(np.median(tail)))
                ev["recovered_frac"] = float(
                    (peak_lin - ev["end_level"]) / max(peak_lin - lin_b0, 1e-300)
                )
                divergence = Event(
                    "divergence",
                    step[on],
                    step[-1],
                    "critical",
                    f"{metric} jumped x{ev['ratio']:.3g} and never came back",
                    ev,
                    metric=metric,
                )
            else:
                events.append(
                    Event(
                        "spike",
                        step[on],
                        step[-1],
                        "warning",
                        f"{metric} jump at the last point; recovery unknown",
                        ev,
                        metric=metric,
                    )
                )
            break
        e = e_lin
        # log-scale tail: later jumps below half the peak are aftershocks
        cap = e + 4 * (e - on) + 5
        tail_end = min(e_log if e_log is not None else n, cap)
        tail_level = b0 + 0.5 * excess
        t_end = max(e, e_log if e_log is not None else tail_end)
        n_hi = int(np.sum(y[on:t_end] - b0 > thr_hi[on:t_end]))
        up_log = (e_log if e_log is not None else tail_end) - on
        mask[on : max(e, tail_end)] = True
        if up_log <= 1 or n_hi < 2:
            events.append(
                Event(
                    "outlier",
                    step[on],
                    step[on],
                    "info",
                    f"single-point {metric} outlier (x{ev['ratio']:.3g})",
                    ev,
                    metric=metric,
                )
            )
        else:
            rec_steps = int(step[e] - step[on])
            ev["recovery_steps"] = rec_steps
            ev["recovery_points"] = e - on
            slow = e - on > max(10, 0.01 * n)
            events.append(
                Event(
                    "spike",
                    step[on],
                    step[e],
                    "critical" if slow else "warning",
                    f"{metric} spike x{ev['ratio']:.3g}, recovered in {rec_steps} steps",
                    ev,
                    metric=metric,
                )
            )
        pos = e
    return events, mask, divergence


def _lr_change(lr, bounds, c_lo, c_hi):
    """The largest single-step LR decrease inside coarse range [c_lo, c_hi), and the ratio
    of the LR after it to the LR before it (medians over the range on each side)."""
    if lr is None:
        return None
    a, b = int(bounds[c_lo]), int(bounds[min(c_hi, bounds.size - 1)])
    seg = lr[a:b]
    ok = np.isfinite(seg) & (seg > 0)
    if ok.sum() < 2:
        return None
    s = seg[ok]
    r = s[1:] / s[:-1]
    j = int(np.argmin(r))
    before, after = s[: j + 1], s[j + 1 :]
    return {
        "lr_before": float(np.median(before[-max(1, before.size // 2) :])),
        "lr_after": float(np.median(after[: max(1, after.size // 2)])),
        "lr_min_step_ratio": float(r[j]),
        "lr_change_index": int(np.flatnonzero(ok)[j + 1] + a),
    }


def _lr_steps_coarse(lr, bounds, m):
    """Coarse blocks containing a sudden LR decrease (one logged step by >= 20%)."""
    ok = np.isfinite(lr) & (lr > 0)
    idx = np.flatnonzero(ok)
    out = np.zeros(m, dtype=bool)
    if idx.size < 2:
        return out
    v = lr[idx]
    drop = idx[1:][v[1:] / v[:-1] <= LR_STEP]
    if drop.size:
        out[np.searchsorted(bounds, drop, side="right") - 1] = True
    return out


def _improvements(ctx: CurveContext, lr, metric: str, stop_at: int | None, cmask=None):
    c = ctx.coarse
    m = c.size
    bounds = ctx.bounds
    step = ctx.step
    out: list[tuple[Event, int, float]] = []
    if m < 8:
        return out
    w = int(np.clip(round(m / 40), 3, 64))
    g = max(1, w // 3)
    ctx.window = w
    sig_c = max(diff_noise(c), 1e-12)
    lvl, slope = window_fits(c, w)  # index k <-> window c[k:k+w], i = k + w
    med_w = np.median(np.lib.stride_tricks.sliding_window_view(c, w), axis=1)  # start k
    c_sm = rolling_median(c, 3)
    i = np.arange(w, m - g - w + 1)
    if i.size == 0:
        return out
    lvl_end = lvl[i - w]
    sl = np.minimum(slope[i - w], 0.0)
    dist = g + (w - 1) / 2.0 + 1.0
    pred = lvl_end + sl * dist
    med_r = med_w[i + g]
    j2 = np.minimum(i + g + w, med_w.size - 1)
    med_r2 = med_w[j2]
    E = med_r - pred
    # local noise: rolling median of |first differences| around the left/right windows
    ad = np.abs(np.diff(c, prepend=c[0]))
    loc = rolling_median(ad, 4 * w + 1) * (1.4826 / math.sqrt(2.0))
    sig_loc = np.maximum(
        sig_c, np.maximum(loc[i - w // 2 - 1], loc[np.minimum(i + g + w // 2, m - 1)])
    )
    sig_e = sig_loc * math.sqrt(math.pi / (2 * w) + 4.0 / w)
    z = np.full(i.size, Z_IMP)
    if lr is not None:
        # a logged LR step is a known intervention: test it at a lower z
        near = _lr_steps_coarse(lr, bounds, m)
        if near.any():
            cm = np.concatenate([[0], np.cumsum(near)])
            z = np.where(
                cm[np.minimum(i + g + 1, m)] - cm[np.maximum(i - w // 2 - 1, 0)] > 0, Z_LR, z
            )
    thr = np.maximum(z * sig_e, MIN_EFFECT)
    # the improvement must set a new best: below the best window median of the preceding
    # four windows (a recovery from a spike is not an improvement). Window medians, not
    # single points: the minimum of a noisy curve sits far below its level.
    lmin = np.array([med_w[max(0, k - 4 * w) : k - w + 1].min() for k in i])
    ok = (
        (thr <= -E)
        & (SUDDEN * np.abs(sl) * w <= -E)
        & (med_r2 - lvl_end <= 0.5 * E)
        & (med_r < lmin)
    )
    if stop_at is not None:
        ok &= i < stop_at
    if cmask is not None and cmask.any():
        # the trend before an excursion's recovery is meaningless
        cm = np.concatenate([[0], np.cumsum(cmask)])
        ok &= cm[np.minimum(i + g + w, m)] - cm[i - w] == 0
    cand = np.flatnonzero(ok)
    order = cand[np.argsort(E[cand])]
    taken = np.zeros(m, dtype=bool)
    for k in order:
        ii = int(i[k])
        if taken[ii]:
            continue
        eff = float(-E[k])
        # onset: first point clearly below the extrapolated trend
        on = None
        for t in range(max(ii - w, 1), min(ii + g + w, m)):
            if c_sm[t] < lvl_end[k] + sl[k] * (t - ii + 1) - 0.3 * eff:
                on = t
                break
        if on is None:
            on = ii
        # end of the transition: first point within 10% of the new level
        new = float(med_r[k])
        end = on
        for t in range(on, min(m, ii + g + 2 * w)):
            end = t
            if c_sm[t] <= new + 0.1 * eff:
                break
        # refine the onset to the knee: the point furthest above the chord from 3 windows
        # before to the end of the transition (where a gradual acceleration starts)
        a = max(0, on - 3 * w)
        if end > a + 1:
            t = np.arange(a, on + 1)
            chord = c_sm[a] + (c_sm[end] - c_sm[a]) * (t - a) / (end - a)
            d = c_sm[a : on + 1] - chord
            kn = int(np.argmax(d))
            if d[kn] > 0.1 * eff and a + kn + 1 < on:
                on = a + kn + 1
        lo, hi = max(0, on - 2 * w - g), min(m, end + 2 * w + g)
        if taken[lo:hi].any() and any(lo <= t[1] <= hi for t in out):
            continue
        taken[max(0, ii - 2 * w - g) : min(m, ii + 2 * w + g)] = True
        lin = ctx.scale.linear
        ev = {
            "log_drop": eff,
            "z": eff / sig_e[k] if sig_e[k] > 0 else float("inf"),
            "level_before": float(lin(lvl_end[k])),
            "level_after": float(lin(new)),
            "ratio": float(math.exp(-eff)) if ctx.scale.kind != "asinh" else float("nan"),
            "trend_before": float(slope[ii - w]),
        }
        info = _lr_change(lr, bounds, max(0, min(on, ii) - w), min(m, max(on, ii) + w + g))
        kind = "kick_in"
        cause = f"sudden sustained improvement of {metric} (x{ev['ratio']:.3g}) "
        if info is not None:
            ev.update(info)
            ratio = info["lr_after"] / info["lr_before"]
            ev["lr_ratio"] = ratio
            if ratio <= LR_TOTAL and info["lr_min_step_ratio"] <= LR_STEP:
                kind = "lr_drop"
                cause = f"LR decreased x{ratio:.3g}; {metric} improved x{ev['ratio']:.3g}"
                ev["lr_change_step"] = float(ctx.step[info["lr_change_index"]])
                ev["loss_onset_step"] = float(step[int(bounds[on])])
            elif ratio > 1.0 / LR_TOTAL:
                cause += f"while the LR increased x{ratio:.3g}"
            else:
                cause += "not explained by an LR change"
        else:
            cause += "(no LR logged)"
        s_on = step[int(bounds[on])]
        if kind == "lr_drop":
            s_on = (
                min(s_on, int(ev["lr_change_step"]))
                if ev["lr_change_step"] < s_on
                else int(ev["lr_change_step"])
            )
        # an lr_drop starts at the LR change, which may come after the noisy knee estimate
        s_end = max(step[int(bounds[end + 1]) - 1], s_on)
        out.append(
            (Event(kind, s_on, s_end, "info", cause.strip(), ev, metric=metric), on, eff, end)
        )
    out.sort(key=lambda t: t[1])
    return out


def _plateaus(ctx: CurveContext, imps, metric: str, ev_end):
    c = ctx.coarse
    m = c.size
    if m < 8:
        return []
    c_sm = rolling_median(c, 3)
    sig_c = diff_noise(c)
    min_len = max(5, round(m / 10))
    events = []
    prev_end = 0
    for ev, on, eff, _ in imps:
        k = on - 1
        if k <= prev_end:
            prev_end = on
            continue
        level = c_sm[k]
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
            if (c_sm[a] - c_sm[j - 1]) / max(1, j - 1 - a) > PLATEAU_PACE * pace:
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


def _level_divergence(ctx: CurveContext, metric: str):
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
    sig_c = diff_noise(c)
    if rise < max(6 * sig_c, DIV_MIN):
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
    exc, mask, div = _excursions(st, y, scale, metric)
    yc = y.copy()
    yc[mask] = np.nan
    yc = fill_nan(yc)
    ctx.bounds = block_bounds(y.size, COARSE_POINTS)
    ctx.coarse = block_reduce(yc, ctx.bounds, "median")
    ctx.window = int(np.clip(round(ctx.coarse.size / 40), 3, 64))
    stop_at = None
    cmask = block_reduce(mask.astype(np.float64), ctx.bounds, "max") > 0
    if div is None:
        lv = _level_divergence(ctx, metric)
        if lv is not None:
            # a rise that starts in an excursion's recovery tail is the spike's business
            w = max(3, ctx.window)
            lo, hi = max(0, lv[1] - w), min(cmask.size, lv[1] + w)
            if not cmask[lo:hi].any():
                div, stop_at = lv
    else:
        stop_at = int(np.searchsorted(st[ctx.bounds[:-1]], div.step, side="right"))
    imps = _improvements(ctx, lrv, metric, stop_at, cmask)
    if div is not None:
        exc = [e for e in exc if e.step < div.step]
        events.append(div)
    events.extend(exc)
    events.extend(t[0] for t in imps)
    events.extend(_plateaus(ctx, imps, metric, {id(e): end for e, _, _, end in imps}))
    return events, ctx
