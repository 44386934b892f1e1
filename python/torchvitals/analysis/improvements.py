"""Improvements on the coarse curve: ``kick_in`` and ``lr_drop`` events.

With a window ``w = clip(n/40, 3, 64)`` of coarse points, the level after each point is
compared with the extrapolated trend of the window before it. A drop that beats the trend
by ``max(z sigma_E, 0.02)`` (z = 5, or 3 next to a logged LR step), sets a new best level and
is still half there one window later is an improvement, placed at the knee of the
transition; a sudden LR decrease near it makes it an ``lr_drop``.
"""

from __future__ import annotations

import math

import numpy as np

from .context import CurveContext
from .events import Event
from .series import diff_noise, rolling_median, window_fits

# Thresholds on the log-badness scale; chosen once on the development set, shared by every
# curve.
Z_IMP = 5.0
Z_LR = 3.0
MIN_EFFECT = 0.02
SUDDEN = 1.0
LR_TOTAL = 0.7
LR_STEP = 0.8
SLOW = 4  # the second, slower scale: this many windows
SLOW_SUDDEN = 4.0
SLOW_MIN_EFFECT = 0.1


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


def find_improvements(ctx: CurveContext, lr, metric: str, stop_at: int | None, cmask=None):
    """Improvements at the window ``w`` and, where none was found there, at ``4 w``: a
    gradual fall on a noisy curve is too slow to beat the trend within one window and too
    small against the noise of its medians, but sudden at four windows."""
    m = ctx.coarse.size
    out: list[tuple[Event, int, float, int]] = []
    if m < 8:
        return out
    w = int(np.clip(round(m / 40), 3, 64))
    ctx.window = w
    taken = np.zeros(m, dtype=bool)
    _scan(ctx, lr, metric, stop_at, cmask, w, False, taken, out)
    if SLOW * w <= m / 8:
        # at the slow scale only a large fall from a level: a smooth decline, or a few
        # percent over thousands of steps, is ordinary training
        _scan(ctx, lr, metric, stop_at, cmask, SLOW * w, True, taken, out)
    out.sort(key=lambda t: t[1])
    return out


def _scan(ctx: CurveContext, lr, metric, stop_at, cmask, w: int, slow: bool, taken, out):
    """Improvements at window ``w`` where ``taken`` is free, appended to ``out``; ``slow``:
    the second scale (stricter: :data:`SLOW_SUDDEN`, :data:`SLOW_MIN_EFFECT`)."""
    sudden, min_effect = (SLOW_SUDDEN, SLOW_MIN_EFFECT) if slow else (SUDDEN, MIN_EFFECT)
    c = ctx.coarse
    m = c.size
    bounds = ctx.bounds
    step = ctx.step
    g = max(1, w // 3)
    sig_c = max(diff_noise(c), 1e-12)
    lvl, slope = window_fits(c, w)  # index k <-> window c[k:k+w], i = k + w
    med_w = np.median(np.lib.stride_tricks.sliding_window_view(c, w), axis=1)  # start k
    c_sm = rolling_median(c, 3)
    c_slow = rolling_median(c, max(3, (w // 4) | 1)) if slow else c_sm
    i = np.arange(w, m - g - w + 1)
    if i.size == 0:
        return
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
    thr = np.maximum(z * sig_e, min_effect)
    # the improvement must set a new best: below the best window median of the preceding
    # four windows (a recovery from a spike is not an improvement). Window medians, not
    # single points: the minimum of a noisy curve sits far below its level.
    lmin = np.array([med_w[max(0, k - 4 * w) : k - w + 1].min() for k in i])
    ok = (
        (thr <= -E)
        & (sudden * np.abs(sl) * w <= -E)
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
        a = max(0, on - 3 * w)
        if slow:
            # a gradual fall has no sharp knee: its onset is where a tenth of it is done,
            # the smoothed curve a tenth of the way from the level before to the new level
            # (a knee point, or a two-segment least-squares fit, lands 60-120 steps early
            # on a convex fall)
            # (from where the smoothed curve stays below that, so a noise dip before the
            # fall does not count)
            top = float(np.median(c[ii - w : ii]))
            cut = top - 0.1 * (top - new)
            lo = max(ii - w, 1)
            above = np.flatnonzero(c_slow[lo : end + 1] >= cut)
            on = lo + int(above[-1]) + 1 if above.size else lo
        elif end > a + 1:
            # refine the onset to the knee: the point furthest above the chord from 3
            # windows before to the end of the transition (where an acceleration starts)
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


def merge_continuing(imps, plateaus: list[Event], has_ratio: bool):
    """One event per phenomenon: a kick-in that follows another with no plateau between
    them (:func:`~torchvitals.analysis.plateaus.find_plateaus` found none before it) is
    the same fall going on after a pause: it is folded into the first, whose end and size
    take it in. A kick-in after a plateau stays a kick-in of its own."""
    after_plateau = {p.evidence["followed_by_step"] for p in plateaus}
    merged: list[tuple[Event, int, float, int]] = []
    for item in imps:
        ev, _, eff, end = item
        if merged:
            prev, p_on, p_eff, p_end = merged[-1]
            if prev.kind == ev.kind == "kick_in" and float(ev.step) not in after_plateau:
                tot = p_eff + eff
                e = prev.evidence
                e["log_drop"] = tot
                e["level_after"] = ev.evidence["level_after"]
                e["ratio"] = float(math.exp(-tot)) if has_ratio else float("nan")
                e["z"] = max(e["z"], ev.evidence["z"])
                e["stages"] = e.get("stages", 1.0) + 1.0
                e["continued_step"] = float(ev.step)
                why = prev.cause.split(") ", 1)[1]
                prev.cause = (
                    f"sudden sustained improvement of {prev.metric} (x{e['ratio']:.3g}, "
                    f"continuing after a pause at step {ev.step}) {why}"
                )
                prev.end_step = max(prev.end_step, ev.end_step)
                merged[-1] = (prev, p_on, tot, max(p_end, end))
                continue
        merged.append(item)
    return merged
