"""Excursions at full resolution: spikes, single-point outliers and sudden divergence.

Each point is compared with the median of the preceding five blocks (block size
``ceil(N / 4096)``): the pre-excursion baseline. Points more than ``max(5 sigma, 0.1)``
above it open an excursion (sigma: robust, local point-to-point noise). The excursion is
over when the curve is back within the noise band of that baseline: the median of three
consecutive points within ``max(3 sigma, 0.05)`` of it on log scale. Undoing most of a
large jump is not a recovery while the loss is still well above the baseline.

``evidence``: ``baseline``, ``peak`` (linear), ``ratio`` (peak / baseline), ``end_level``
(the level where it ended), ``recovery_steps`` (onset to back in the band),
``recovery_90_steps`` (onset to 90% of the jump undone on linear scale), ``area``
(the excess log-loss summed over the excursion, in log-units x steps: how much training it
cost) and ``steps_above_2x`` (steps spent above twice the baseline).

One elevated point that is back in the band at the next point is an ``outlier`` (info);
anything longer a ``spike`` (warning; critical when it lasts more than max(10 points, 1% of
the run)); never coming back a ``divergence``. Later jumps inside an excursion's tail are
aftershocks.
"""

from __future__ import annotations

import math

import numpy as np

from .events import Event
from .series import Scale, block_bounds, block_reduce, robust_sigma, rolling_median, trailing_median

# Thresholds on the log-badness scale; chosen once on the development set, shared by every
# curve.
K_HI = 5.0  # excursion opens at K_HI robust sigmas above the baseline ...
MIN_SPIKE = 0.10  # ... and at least 10% (log 1.105)
K_LO = 3.0  # excursion is over within K_LO sigmas ...
MIN_BACK = 0.05  # ... or 5%
LIN_RECOVERY = 0.90
LIN_BACK = 0.97  # or once 95% of the jump is undone on linear scale
BASE_BLOCKS = 5  # baseline = median of this many preceding blocks
BASE_MIN = 3  # ... and at least this many
SPIKE_BLOCKS = 4096  # block resolution for the excursion baseline


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


def _back_in_band(y: np.ndarray, start: int, level: float) -> int | None:
    """First index >= ``start`` where the median of three consecutive points is <= ``level``."""
    n = y.size
    chunk = 64
    while start < n:
        stop = min(n, start + chunk)
        m3 = _median3_from(y[start : min(n, stop + 2)])[: stop - start]
        hit = np.flatnonzero(m3 <= level)
        if hit.size:
            return start + int(hit[0])
        start = stop
        chunk *= 4
    return None


def find_excursions(step, y, scale: Scale, metric: str):
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
    thr_lo_pt = np.maximum(K_LO * sig_pt, MIN_BACK)
    cand = np.flatnonzero(valid & (r > thr_hi))
    pos = 0
    tail_end, tail_level = 0, -np.inf
    divergence = None
    lin = scale.linear
    pending: list[tuple[int, int, int | None, float, float]] = []
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
        e90 = e_lin
        if e_log is None:
            e_log = _back_in_band(y, e90, b0 + thr_lo)
        # log-scale tail: later jumps below half the peak are aftershocks
        cap = e90 + 4 * (e90 - on) + 5
        tail_end = min(e_log if e_log is not None else n, cap)
        tail_level = b0 + 0.5 * excess
        pending.append((len(events), on, e_log, b0, thr_lo))
        e = e_log if e_log is not None else n - 1  # back in the baseline's noise band
        up_log = e - on
        mask[on : max(e90, tail_end)] = True
        exc = np.maximum(y[on:e] - b0, 0.0)
        dt = np.diff(step[on : e + 1]).astype(np.float64) if e > on else np.zeros(0)
        ev["area"] = float(np.sum(exc * dt)) if dt.size == exc.size else float(exc.sum())
        ev["end_level"] = float(lin(np.median(y[e : min(n, e + 3)])))
        if scale.kind != "asinh":
            ev["steps_above_2x"] = float(np.sum(dt[y[on:e] - b0 > math.log(2.0)]))
        n_hi = int(np.sum(y[on : e + 1] - b0 > thr_hi[on : e + 1]))
        if up_log <= 1 or (n_hi < 2 and up_log <= 3):
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
            ev["recovery_90_steps"] = float(step[e90] - step[on])
            slow = e - on > max(10, 0.01 * n)
            events.append(
                Event(
                    "spike",
                    step[on],
                    step[e],
                    "critical" if slow else "warning",
                    f"{metric} spike x{ev['ratio']:.3g} lasting {rec_steps} steps until back "
                    f"at its baseline {lin_b0:.4g} (area {ev['area']:.3g} log-loss x steps)",
                    ev,
                    metric=metric,
                )
            )
        pos = e90
    divergence = _close(events, pending, step, y, lin, metric, divergence)
    return events, mask, divergence


def _close(events, pending, step, y, lin, metric, divergence):
    """Spikes end where the curve is back in the band, or where the next jump starts; one
    still above its baseline at the end of the run is lasting damage: a divergence when
    the loss ends at least twice its baseline, else a critical spike."""
    n = y.size
    for j, (k, on, e_log, b0, _) in enumerate(pending):
        ev = events[k]
        nxt = pending[j + 1][1] if j + 1 < len(pending) else None
        if nxt is None and divergence is not None:
            nxt = int(np.searchsorted(step, divergence.step))
        if nxt is not None and (e_log is None or e_log >= nxt):
            end = max(on, nxt - 1)
            if ev.kind == "spike":
                ev.end_step = int(step[end])
                ev.evidence["back_at_baseline"] = 0.0
                ev.evidence["recovery_steps"] = float(step[end] - step[on])
                ev.cause = (
                    f"{metric} spike x{ev.evidence['ratio']:.3g}, not back at its baseline "
                    f"{lin(b0):.4g} before the next jump at step {int(step[nxt])}"
                )
            continue
        if e_log is not None:
            if ev.kind == "spike":
                ev.evidence["back_at_baseline"] = 1.0
            continue
        # never back in the band, nothing after it
        end_level = float(np.median(y[max(on + 1, n - max(3, (n - on) // 5)) :]))
        ev.evidence["end_level"] = float(lin(end_level))
        ev.evidence["back_at_baseline"] = 0.0
        if end_level - b0 >= math.log(2.0) and divergence is None:
            events.pop(k)
            return Event(
                "divergence",
                ev.step,
                int(step[-1]),
                "critical",
                f"{metric} jumped x{ev.evidence['ratio']:.3g} and never came back: it ends "
                f"x{math.exp(end_level - b0):.3g} above its baseline {lin(b0):.4g}",
                ev.evidence,
                metric=metric,
            )
        ev.kind = "spike"
        ev.severity = "critical"
        ev.end_step = int(step[-1])
        ev.evidence["recovery_steps"] = float(step[-1] - ev.step)
        ev.cause = (
            f"{metric} spike x{ev.evidence['ratio']:.3g}, still x"
            f"{math.exp(end_level - b0):.3g} above its baseline {lin(b0):.4g} at the end of "
            "the run (lasting damage)"
        )
    return divergence
