"""Every step change of the logged learning rate is an event: ``lr_drop`` or ``lr_rise``.

An LR change is one logged step where the LR moves by at least 20% (ratio <= 0.8 or >= 1.25)
while it was steady before and after it (it moved by less than 5% over the preceding and
the following ``min(10, gap)`` logged points): the steps of a schedule (MultiStepLR, a manual
cut, a resume), never the ramps of a warm-up, a cosine or a linear decay.

The event is anchored at the LR change. Its loss response is measured on the log-badness
curve: the level over ``W`` points after the change (``W``: a twentieth of the run, at
least 5 points, at most the distance to the neighbouring changes) against the trend of the
``W`` points before it extrapolated over the same stretch (a rising trend is extrapolated
flat); when that shows no measurable effect, again with ``2 W`` and ``4 W`` (a slow
response under noise builds over several windows; there the effect must be at least
x1.1). ``evidence``: ``log_effect`` (> 0: the loss improved), ``ratio`` (after / before),
``z`` (effect over its standard error, from the residual noise around the trend) and
``confidence`` (``high``: z >= 5, ``medium``: z >= 3, else ``none``: "no measurable
effect"), ``response_steps`` (steps until half of the change is done; the attribution looks
for layer changes within three response times after the LR change).
"""

from __future__ import annotations

import math

import numpy as np

from .events import Event
from .series import robust_sigma, rolling_median

STEP_DOWN, STEP_UP = 0.8, 1.25
STEADY = math.log(1.05)
STEADY_POINTS = 10
Z_HIGH, Z_MED = 5.0, 3.0
MIN_EFFECT = 0.02
WIDEN = (1, 2, 4)  # response windows tried, in multiples of the default
WIDE_MIN_EFFECT = 0.1  # x1.1: the least effect measured over a widened window


def lr_change_points(lr: np.ndarray) -> list[tuple[int, float, float]]:
    """``(index, lr_before, lr_after)`` of each step change of ``lr`` (see module doc)."""
    if lr is None:
        return []
    ok = np.flatnonzero(np.isfinite(lr) & (lr > 0))
    if ok.size < 3:
        return []
    v = np.log(lr[ok])
    d = np.diff(v)
    cand = np.flatnonzero((d <= math.log(STEP_DOWN)) | (d >= math.log(STEP_UP))) + 1
    out = []
    for j, c in enumerate(cand):
        prev_c = cand[j - 1] if j else 0
        next_c = cand[j + 1] if j + 1 < cand.size else v.size
        m_b = min(STEADY_POINTS, c - prev_c)
        m_a = min(STEADY_POINTS, next_c - c)
        if m_b < 1 or m_a < 1:
            continue
        if m_b >= 2 and abs(v[c - 1] - v[c - m_b]) > STEADY:
            continue  # a ramp, not a step
        if m_a >= 2 and abs(v[c + m_a - 1] - v[c]) > STEADY:
            continue
        if c - prev_c < 2 and j and c - 1 == cand[j - 1]:
            continue  # the second half of a two-step change
        out.append((int(ok[c]), float(lr[ok[c - 1]]), float(lr[ok[c]])))
    return out


def _response(y, k, w_b, w_a):
    """(effect, z, response_points, onset_points) of the level after ``k`` vs the trend before."""
    pre = y[k - w_b : k]
    post = y[k : k + w_a]
    t = np.arange(-w_b, 0, dtype=np.float64)
    if w_b >= 4:
        slope, icpt = np.polyfit(t, pre, 1)
        slope = min(slope, 0.0)
        if slope == 0.0:
            icpt = float(np.median(pre))
    else:
        slope, icpt = 0.0, float(np.median(pre))
    resid = pre - (icpt + slope * t)
    sig = max(robust_sigma(resid), 1e-12)
    ta = np.arange(w_a, dtype=np.float64)
    pred = icpt + slope * ta
    lag = max(0, w_a // 4)  # the response takes a few points to build up
    eff = float(np.median(pred[lag:] - post[lag:]))
    n_a = max(1, w_a - lag)
    se = sig * 1.2533 * math.sqrt(1.0 / w_b + 1.0 / n_a)
    # independent-noise standard errors are too small for autocorrelated wiggle: add the
    # spread of the pre-change window's own half-to-half level differences
    if w_b >= 8:
        h = w_b // 2
        se = math.hypot(se, 0.5 * abs(float(np.median(resid[:h]) - np.median(resid[h:]))))
    z = eff / se if se > 0 else math.inf
    # response time: first point after k where half of the change is done (smoothed)
    sm = rolling_median(post - pred, max(3, (w_a // 8) | 1))
    half = np.flatnonzero(np.sign(eff) * -sm >= 0.5 * abs(eff)) if eff else np.zeros(0, int)
    resp = int(half[0]) if half.size else w_a
    start = np.flatnonzero(np.sign(eff) * -sm >= 0.1 * abs(eff)) if eff else np.zeros(0, int)
    onset = int(start[0]) if start.size else 0
    return eff, z, resp, onset, sig


def lr_events(step, y, index, lr, scale, metric: str) -> list[Event]:
    """``lr_drop``/``lr_rise`` events; ``y`` is the log-badness curve of the finite points
    ``index`` (into ``step``/``lr``)."""
    out: list[Event] = []
    changes = lr_change_points(lr)
    if not changes or y.size < 4:
        return out
    pos_of = np.searchsorted(index, [c for c, _, _ in changes])
    n = y.size
    w_def = int(np.clip(round(n / 20), 5, 500))
    bounds = [0, *[int(p) for p in pos_of], n]
    for j, (c, before, after) in enumerate(changes):
        k = int(pos_of[j])
        w_b = min(w_def, k - bounds[j])
        w_a = min(w_def, bounds[j + 2] - k)
        ratio_lr = after / before
        kind = "lr_drop" if ratio_lr < 1 else "lr_rise"
        ev = {
            "lr_before": before,
            "lr_after": after,
            "lr_ratio": ratio_lr,
            "lr_change_step": float(step[c]),
            "lr_change_index": float(c),
        }
        what = f"LR x{ratio_lr:.3g} at step {int(step[c])}"
        end = int(step[c])
        if w_b < 2 or w_a < 2 or k >= n:
            ev["confidence"] = "none"
            cause = f"{what}: too few points around it to measure the {metric} response"
        else:
            # a slow response under noise (it builds over several windows) is measured
            # on longer windows, as far as the neighbouring changes allow
            for f in WIDEN:
                w_b = min(f * w_def, k - bounds[j])
                w_a = min(f * w_def, bounds[j + 2] - k)
                eff, z, resp, onset, _ = _response(y, k, w_b, w_a)
                conf = "none"
                # over a longer window a straight trend fits a curved loss less well: only a
                # large effect counts there
                if abs(eff) >= (MIN_EFFECT if f == 1 else WIDE_MIN_EFFECT) and abs(z) >= Z_MED:
                    conf = "high" if abs(z) >= Z_HIGH else "medium"
                    break
            lin = scale.linear
            ev.update(
                log_effect=eff,
                z=z,
                confidence=conf,
                ratio=float(math.exp(-eff)) if scale.kind != "asinh" else float("nan"),
                level_before=float(lin(np.median(y[k - w_b : k]))),
                level_after=float(lin(np.median(y[k + w_a // 4 : k + w_a]))),
                window_points=float(w_a),
            )
            if conf == "none":
                cause = f"{what}: no measurable effect on the {metric} (z={z:.2g})"
            else:
                i_resp = int(index[min(k + resp, n - 1)])
                i_on = int(index[min(k + onset, n - 1)])
                ev["response_steps"] = float(step[i_resp] - step[c])
                ev["response_points"] = float(resp)
                ev["loss_onset_step"] = float(step[i_on])
                ends = int(index[min(k + min(w_a - 1, 3 * max(resp, 1)), n - 1)])
                end = max(int(step[ends]), int(step[c]))
                word = "improved" if eff > 0 else "worsened"
                cause = (
                    f"{what}: {metric} {word} x{math.exp(abs(eff)):.3g} "
                    f"(half of it within {int(ev['response_steps'])} steps; "
                    f"{conf} confidence, z={z:.3g})"
                )
        out.append(Event(kind, int(step[c]), end, "info", cause, ev, metric=metric))
    return out
