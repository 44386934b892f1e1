"""Layout of the range-free log2 histogram that every statistic row carries.

Bin 0 counts exact zeros, bin 1 finite values below ``2**MIN_EXP``, then one bin per
power of two (``2**k <= |x| < 2**(k+1)`` for ``k`` in ``[MIN_EXP, MAX_EXP]``), then
finite values ``>= 2**(MAX_EXP + 1)``, and last NaN and +-Inf. The engine counts twice
over these bins: every element (``hist``) and the negative ones alone (``neg_hist``:
``x < 0``, so never a zero or a NaN, and ``-Inf`` in the last bin), which keeps the sign
that TensorBoard and wandb histograms show. The window is fixed, so
no min/max pre-pass (and no host sync) is needed, and rows of different steps and
layers are directly comparable. The constants come from the compiled engine
(``csrc/stats.h``), the single source of truth.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from torchvitals import _C

MIN_EXP: int = _C.HIST_MIN_EXP
MAX_EXP: int = _C.HIST_MAX_EXP
NUM_BINS: int = _C.HIST_BINS
#: Rows of the engine's histogram output per tensor: every element, then the negative ones.
ROWS: int = _C.HIST_ROWS
ALL_ROW = 0
NEGATIVE_ROW = 1
ZERO_BIN = 0
BELOW_BIN = 1
FIRST_EXP_BIN = 2
ABOVE_BIN = FIRST_EXP_BIN + (MAX_EXP - MIN_EXP + 1)
NONFINITE_BIN = ABOVE_BIN + 1


@dataclass(frozen=True)
class HistLayout:
    """Bin ``i`` counts finite ``|x|`` in ``[lower[i], upper[i])``, except the zero bin
    (``|x| == 0``) and the non-finite bin (``lower = upper = nan``)."""

    lower: np.ndarray
    upper: np.ndarray
    labels: tuple[str, ...]
    min_exp: int = MIN_EXP
    max_exp: int = MAX_EXP


def hist_edges() -> HistLayout:
    """The histogram layout: bounds and a label for each of the ``NUM_BINS`` bins."""
    exps = np.arange(MIN_EXP, MAX_EXP + 1, dtype=np.float64)
    lower = np.concatenate(
        [[0.0, np.nextafter(0.0, 1.0)], 2.0**exps, [2.0 ** (MAX_EXP + 1), np.nan]]
    )
    upper = np.concatenate([[0.0, 2.0**MIN_EXP], 2.0 ** (exps + 1), [np.inf, np.nan]])
    labels = ("0", f"<2^{MIN_EXP}", *(f"2^{int(k)}" for k in exps), f">=2^{MAX_EXP + 1}", "nan/inf")
    return HistLayout(lower=lower, upper=upper, labels=labels)
