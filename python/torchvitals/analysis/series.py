"""Scale-free helpers for training curves: log-scale transform, robust noise, block
downsampling and small rolling filters.

Everything here is O(N) numpy so that curves with millions of points stay cheap; detectors
work on a block-median "coarse" curve of at most :data:`COARSE_POINTS` points, so that their
windows are fractions of the run rather than fixed step counts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

#: Maximum length of the coarse (block-median) curve the detectors work on.
COARSE_POINTS = 2048

_MAD_TO_SIGMA = 1.4826


def as_1d(name: str, a, *, dtype=np.float64) -> np.ndarray:
    """``a`` as a 1-D array; ``ValueError`` naming ``name`` otherwise."""
    try:
        arr = np.asarray(a, dtype=dtype)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name}: cannot convert to a numeric array ({exc})") from None
    if arr.ndim == 0:
        raise ValueError(f"{name}: expected a 1-D array, got a scalar")
    if arr.ndim != 1:
        raise ValueError(f"{name}: expected a 1-D array, got shape {arr.shape}")
    return arr


def robust_sigma(x: np.ndarray) -> float:
    """1.4826 * median absolute deviation of the finite values (0.0 if fewer than 2)."""
    x = x[np.isfinite(x)]
    if x.size < 2:
        return 0.0
    med = np.median(x)
    return float(_MAD_TO_SIGMA * np.median(np.abs(x - med)))


def diff_noise(y: np.ndarray) -> float:
    """Point-to-point noise of ``y``: robust sigma of first differences / sqrt(2).

    Robust to trends (a constant slope only shifts the differences) and to isolated outliers.
    Falls back to the mean absolute difference when the MAD is zero (quantised curves).
    """
    if y.size < 3:
        return 0.0
    d = np.diff(y)
    s = robust_sigma(d) / math.sqrt(2.0)
    if s == 0.0:
        d = d[np.isfinite(d)]
        s = float(np.mean(np.abs(d - np.median(d)))) / math.sqrt(2.0) if d.size else 0.0
    return s


@dataclass
class Scale:
    """The transform from a metric to a "badness" curve on log scale (lower is better).

    ``forward(x)`` gives the log-scale curve, ``linear(y)`` maps it back to a linear
    badness (loss, error rate, or minus the metric), used for recovery fractions.
    """

    kind: str  # "log", "log_error", "asinh"
    offset: float = 0.0
    sign: float = 1.0
    scale: float = 1.0
    floor: float = 0.0

    def forward(self, x: np.ndarray) -> np.ndarray:
        if self.kind == "asinh":
            return np.arcsinh((self.offset + self.sign * x) / self.scale)
        b = self.offset + self.sign * x / self.scale
        return np.log(np.maximum(b, self.floor))

    def linear(self, y: np.ndarray | float) -> np.ndarray | float:
        if self.kind == "asinh":
            return np.sinh(y)
        return np.exp(y)


def fit_scale(x: np.ndarray, higher_is_better: bool = False) -> Scale:
    """Choose a log-like transform for metric values ``x`` (finite values only).

    * losses > 0: ``log(x)``; zeros are floored at half the smallest positive value;
    * accuracies (higher is better) in [0, 1] or [0, 100]: log of the error rate;
    * anything else (negative losses, rewards): log of the badness shifted so that its best
      value sits one interquartile range above zero.
    """
    x = x[np.isfinite(x)]
    if x.size == 0:
        return Scale("log", floor=1e-300)
    lo, hi = float(x.min()), float(x.max())
    if higher_is_better and lo >= 0.0 and hi <= 1.0:
        sc = Scale("log_error", offset=1.0, sign=-1.0, scale=1.0)
    elif higher_is_better and lo >= 0.0 and hi <= 100.0 and hi > 1.0:
        sc = Scale("log_error", offset=1.0, sign=-1.0, scale=100.0)
    elif not higher_is_better and lo >= 0.0:
        sc = Scale("log")
    else:
        # shifted log: the best value sits one interquartile range above the origin, so
        # noise near the best value is not blown up and large excursions stay log-like
        sign = -1.0 if higher_is_better else 1.0
        b = sign * x
        ref = float(np.min(b))
        spread = float(np.percentile(b, 75) - np.percentile(b, 25))
        spread = max(spread, 1e-6 * max(1.0, abs(ref)))
        return Scale("log", offset=spread - ref, sign=sign, scale=1.0, floor=1e-300)
    b = sc.offset + sc.sign * x / sc.scale
    pos = b[b > 0]
    sc.floor = 0.5 * float(pos.min()) if pos.size else 1e-12
    return sc


def block_bounds(n: int, max_points: int = COARSE_POINTS) -> np.ndarray:
    """Start indices (plus the final end) of ``ceil(n / B)`` blocks of size ``B``."""
    b = max(1, math.ceil(n / max_points))
    return np.append(np.arange(0, n, b), n)


def block_reduce(y: np.ndarray, bounds: np.ndarray, how: str = "median") -> np.ndarray:
    """Per-block median/mean/max/min/last of ``y`` for blocks given by :func:`block_bounds`.

    NaNs are ignored in ``median``/``mean``/``max``/``min`` (a block of NaNs gives NaN).
    """
    n = y.size
    nb = bounds.size - 1
    if nb == n:  # block size 1
        return y.astype(np.float64, copy=True)
    b = int(bounds[1] - bounds[0])
    full = (n // b) * b
    body = y[:full].reshape(-1, b)
    tail = y[full:]
    has_nan = not np.isfinite(body).all() or (tail.size and not np.isfinite(tail).all())
    if how == "last":
        out = body[:, -1]
        return np.append(out, tail[-1]) if tail.size else out.astype(np.float64)
    fn = {
        "median": np.nanmedian if has_nan else np.median,
        "mean": np.nanmean if has_nan else np.mean,
        "max": np.nanmax if has_nan else np.max,
        "min": np.nanmin if has_nan else np.min,
    }[how]
    with np.errstate(all="ignore"):
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            out = fn(body, axis=1)
            if tail.size:
                out = np.append(out, fn(tail))
    return np.asarray(out, dtype=np.float64)


def rolling_median(y: np.ndarray, width: int) -> np.ndarray:
    """Centred rolling median (odd ``width``), edges use the available points."""
    width = max(1, int(width) | 1)
    if width == 1 or y.size < 3:
        return y.copy()
    h = width // 2
    pad = np.concatenate([np.full(h, np.nan), y, np.full(h, np.nan)])
    win = np.lib.stride_tricks.sliding_window_view(pad, width)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmedian(win, axis=1)


def trailing_median(y: np.ndarray, width: int) -> np.ndarray:
    """Median of the ``width`` values strictly before each index (NaN for index 0)."""
    width = max(1, int(width))
    pad = np.concatenate([np.full(width, np.nan), y[:-1]]) if y.size else y
    if y.size == 0:
        return y.copy()
    win = np.lib.stride_tricks.sliding_window_view(pad, width)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmedian(win, axis=1)


def fill_nan(y: np.ndarray) -> np.ndarray:
    """Linear interpolation over NaNs (edges held constant)."""
    ok = np.isfinite(y)
    if ok.all() or not ok.any():
        return y
    idx = np.arange(y.size)
    out = y.copy()
    out[~ok] = np.interp(idx[~ok], idx[ok], y[ok])
    return out


def window_fits(y: np.ndarray, w: int) -> tuple[np.ndarray, np.ndarray]:
    """Least-squares line over each window ``y[i-w:i]``, evaluated at its last point.

    Returns ``(level_at_end, slope)`` for ``i = w..n`` (arrays of length ``n - w + 1``),
    computed from cumulative sums in O(n).
    """
    n = y.size
    t = np.arange(n, dtype=np.float64)
    c0 = np.concatenate([[0.0], np.cumsum(y)])
    c1 = np.concatenate([[0.0], np.cumsum(t * y)])
    sy = c0[w:] - c0[: n - w + 1]
    sty = c1[w:] - c1[: n - w + 1]
    start = np.arange(n - w + 1, dtype=np.float64)
    # t within window = start + k, k = 0..w-1
    sk = w * (w - 1) / 2.0
    skk = (w - 1) * w * (2 * w - 1) / 6.0
    sky = sty - start * sy
    denom = w * skk - sk * sk
    slope = (w * sky - sk * sy) / denom if denom > 0 else np.zeros_like(sy)
    icpt = (sy - slope * sk) / w
    return icpt + slope * (w - 1), slope
