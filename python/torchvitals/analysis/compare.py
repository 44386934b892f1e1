"""Compare two or more runs: where their metric curves part, which layers differ most, and
their events side by side. Pure computation on the arrays of
:func:`torchvitals.analysis.runtables.series_from_run`; ``torchvitals compare`` renders it
(:mod:`torchvitals.report.compare_page`, the terminal tables in :mod:`torchvitals.cli`).

Every later run is compared with the first (the baseline), on the steps both recorded.

* **Noise band.** A curve's noise is the robust spread of what a running median (window
  :func:`window`) leaves of it: ``1.4826 * MAD`` of the residuals, so a level shift or a
  trend does not count as noise. Two curves differ beyond their noise band where the
  running median of their difference exceeds ``NOISE_K * sqrt(noise_a**2 + noise_b**2)``.
* **First divergence** (:func:`first_divergence`): the first step of the first stretch of
  at least ``window // 2 + 1`` consecutive common steps beyond the band. The running median
  flips where more than half of its window has changed, so a step change is found at its
  step; a spike shorter than half the window never counts. Curves that are positive
  throughout are compared on log10 (a ratio), as the report plots them.
* **Layer differences** (:func:`layer_differences`): per layer and measure, the mean of the
  absolute running-median difference over the common steps: log10 gradient norm (decades,
  on the steps where both norms are positive),
  dead-unit and saturated fractions where both runs measured them. A layer's ``score`` is
  their sum (a fraction of 1.0 weighs as much as a decade), and its first divergence the
  earliest of its measures'.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from .events import Event

__all__ = [
    "NOISE_K",
    "Comparison",
    "EventRow",
    "LayerDifference",
    "PairComparison",
    "RunData",
    "align_events",
    "compare",
    "first_divergence",
    "layer_differences",
    "noise",
    "running_median",
    "window",
]

#: Curves differ where their smoothed difference exceeds this many noise sigmas.
NOISE_K = 3.0
#: Per-layer measures compared: (series prefix, compared on log10).
LAYER_MEASURES = (("grad_norm", True), ("dead_frac", False), ("sat_frac", False))


@dataclass
class RunData:
    """One run's arrays, as ``series_from_run`` returns them, with its name and events."""

    name: str
    step: np.ndarray
    values: np.ndarray  #: the compared metric, aligned on ``step``
    series: Mapping[str, np.ndarray] = field(default_factory=dict)
    events: Sequence[Event] = ()

    @classmethod
    def from_arrays(cls, name: str, arrays: tuple, events: Sequence[Event] = ()) -> RunData:
        """From ``series_from_run(run, metric)``'s ``(step, values, lr, series)``."""
        step, values, _lr, series = arrays
        return cls(name, np.asarray(step), np.asarray(values, np.float64), series, events)


@dataclass(frozen=True)
class LayerDifference:
    layer: str
    score: float  #: sum of the measures' distances below
    distances: dict[str, float]  #: measure -> mean |smoothed difference| (decades or fraction)
    first_divergence: int | None  #: earliest step any measure leaves its noise band
    diverged: tuple[str, ...]  #: the measures that diverge at that step


@dataclass
class PairComparison:
    """A run against the baseline."""

    baseline: str
    other: str
    common_steps: int
    first_divergence: int | None  #: of the metric curves
    band: float  #: the metric's noise band (log10 units when ``log``)
    log: bool  #: the metric was compared on log10
    layers: list[LayerDifference]  #: most different first
    only_in_baseline: list[str]
    only_in_other: list[str]


@dataclass
class EventRow:
    """Events of one kind at about the same step, one (or none) per run."""

    kind: str
    step: int  #: of the row's earliest event
    events: list[Event | None]


@dataclass
class Comparison:
    metric: str
    names: list[str]
    pairs: list[PairComparison]
    events: list[EventRow]


def window(n: int) -> int:
    """The running-median window for ``n`` points: odd, 5 to 21."""
    w = int(np.clip(n // 10, 5, 21))
    return w if w % 2 else w - 1


def running_median(x: np.ndarray, w: int) -> np.ndarray:
    """Centred running median of width ``w`` (odd), the ends padded with the edge values."""
    if x.size == 0:
        return x.astype(np.float64)
    half = w // 2
    padded = np.pad(np.asarray(x, np.float64), half, mode="edge")
    return np.median(np.lib.stride_tricks.sliding_window_view(padded, w), axis=1)


def noise(x: np.ndarray, w: int | None = None) -> float:
    """Robust standard deviation of ``x`` around its running median."""
    x = np.asarray(x, np.float64)
    if x.size < 3:
        return 0.0
    resid = x - running_median(x, w or window(x.size))
    return float(1.4826 * np.median(np.abs(resid - np.median(resid))))


def _on_common(
    a_steps: np.ndarray, a: np.ndarray, b_steps: np.ndarray, b: np.ndarray, log: bool | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray, bool]:
    """``(steps, a, b, log)`` on the steps both have a finite value. ``log``: True compares
    log10 on the steps both are positive (a gradient norm of exactly 0 has no log); None
    compares log10 only when every value is positive (a metric), False never."""
    steps, ia, ib = np.intersect1d(a_steps, b_steps, assume_unique=False, return_indices=True)
    a = np.asarray(a, np.float64)[ia]
    b = np.asarray(b, np.float64)[ib]
    ok = np.isfinite(a) & np.isfinite(b)
    if log is None:
        log = bool(ok.any() and (a[ok] > 0).all() and (b[ok] > 0).all())
    elif log:
        ok &= (a > 0) & (b > 0)
    steps, a, b = steps[ok], a[ok], b[ok]
    if log:
        a, b = np.log10(a), np.log10(b)
    return steps, a, b, log


def _smoothed_difference(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, float]:
    """The running median of ``b - a`` and the noise band both curves leave it."""
    w = window(a.size)
    band = NOISE_K * float(np.hypot(noise(a, w), noise(b, w)))
    # Noise-free curves: only a difference above rounding counts.
    scale = float(np.max(np.abs(np.concatenate([a, b])))) if a.size else 0.0
    band = max(band, 1e-9 * max(scale, 1e-300))
    return running_median(b - a, w), band


def first_divergence(
    steps: np.ndarray, a: np.ndarray, b: np.ndarray, band: float | None = None
) -> int | None:
    """The first step from which ``a`` and ``b`` (aligned on ``steps``, finite) differ
    beyond their noise band for at least half a window; None if they never do.
    ``band``: use this band instead of the one estimated from the curves."""
    if a.size < 5:
        return None
    diff, estimated = _smoothed_difference(a, b)
    beyond = np.abs(diff) > (estimated if band is None else band)
    need = window(a.size) // 2 + 1
    # Start of each stretch of consecutive True values and its length.
    edges = np.flatnonzero(np.diff(np.concatenate([[0], beyond.astype(np.int8), [0]])))
    starts, ends = edges[::2], edges[1::2]
    long = np.flatnonzero(ends - starts >= need)
    return int(steps[starts[long[0]]]) if long.size else None


def layer_differences(base: RunData, other: RunData) -> list[LayerDifference]:
    """Every layer both runs measured, most different first (see the module docstring)."""
    rows = []
    for layer in _layers(base, other)[0]:
        distances: dict[str, float] = {}
        onsets: dict[str, int] = {}
        for measure, log in LAYER_MEASURES:
            key = f"{measure}/{layer}"
            if key not in base.series or key not in other.series:
                continue
            steps, a, b, _ = _on_common(
                base.step, base.series[key], other.step, other.series[key], log
            )
            if steps.size < 5:
                continue
            diff, _band = _smoothed_difference(a, b)
            distances[measure] = float(np.mean(np.abs(diff)))
            onset = first_divergence(steps, a, b)
            if onset is not None:
                onsets[measure] = onset
        if not distances:
            continue
        first = min(onsets.values()) if onsets else None
        rows.append(
            LayerDifference(
                layer,
                float(sum(distances.values())),
                distances,
                first,
                tuple(m for m, s in onsets.items() if s == first),
            )
        )
    rows.sort(key=lambda r: -r.score)
    return rows


def _layers(base: RunData, other: RunData) -> tuple[list[str], list[str], list[str]]:
    """(layers in both, only in base, only in other), in ``base``'s series order."""

    def names(run: RunData) -> list[str]:
        prefixes = {m for m, _ in LAYER_MEASURES}
        found = (k.partition("/") for k in run.series)
        return list(dict.fromkeys(name for p, _, name in found if p in prefixes and name))

    a, b = names(base), names(other)
    sb, sa = set(b), set(a)
    return [n for n in a if n in sb], [n for n in a if n not in sb], [n for n in b if n not in sa]


def _pair(base: RunData, other: RunData) -> PairComparison:
    steps, a, b, log = _on_common(base.step, base.values, other.step, other.values, None)
    band = _smoothed_difference(a, b)[1] if steps.size else 0.0
    _both, only_base, only_other = _layers(base, other)
    return PairComparison(
        base.name,
        other.name,
        int(np.intersect1d(base.step, other.step).size),
        first_divergence(steps, a, b),
        band,
        log,
        layer_differences(base, other),
        only_base,
        only_other,
    )


def align_events(runs: Sequence[RunData], tolerance: int) -> list[EventRow]:
    """The runs' events in rows: an event joins the row of the same kind (and layer) whose
    step is within ``tolerance`` and that has no event of its run yet."""
    rows: list[EventRow] = []
    tagged = [(e.step, i, e) for i, r in enumerate(runs) for e in r.events]
    for step, i, event in sorted(tagged, key=lambda t: (t[0], t[1])):
        for row in rows:
            head = next(e for e in row.events if e is not None)
            if (
                row.kind == event.kind
                and head.layer == event.layer
                and row.events[i] is None
                and abs(row.step - step) <= tolerance
            ):
                row.events[i] = event
                break
        else:
            slots: list[Event | None] = [None] * len(runs)
            slots[i] = event
            rows.append(EventRow(event.kind, event.step, slots))
    return rows


def compare(runs: Sequence[RunData], metric: str = "loss") -> Comparison:
    """Every run against ``runs[0]``, and all their events side by side (events of one kind
    within 2% of the longest run's steps, at least 5 steps, share a row)."""
    if len(runs) < 2:
        raise ValueError(f"compare needs at least two runs, got {len(runs)}")
    longest = max(int(np.ptp(r.step)) if r.step.size else 0 for r in runs)
    tolerance = max(5, longest // 50)
    return Comparison(
        metric,
        [r.name for r in runs],
        [_pair(runs[0], other) for other in runs[1:]],
        align_events(runs, tolerance),
    )
