"""Pure-PyTorch float64 reference for every statistic the engine computes.

Slow and obvious on purpose: the kernel tests compare against it, and it is the
executable definition of each statistic documented in the README.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from torchvitals.engine import histogram
from torchvitals.engine.arguments import per_tensor

STAT_KEYS = (
    "numel",
    "sum",
    "sumsq",
    "max_abs",
    "nan",
    "inf",
    "zeros",
    "saturated",
    "hist",
    "neg_hist",
    "units",
    "dead_units",
    "saturated_units",
)


def hist_bins(x: torch.Tensor) -> torch.Tensor:
    """The histogram bin of every element of ``x`` (int64, same shape); the definition
    of the binning that both kernels implement."""
    a = x.detach().to("cpu", torch.float64).abs()
    # frexp gives a = m * 2**e with m in [0.5, 1): floor(log2 a) = e - 1, exact for subnormals.
    k = torch.frexp(a).exponent.to(torch.int64) - 1
    bins = (k - histogram.MIN_EXP + histogram.FIRST_EXP_BIN).clamp(
        histogram.BELOW_BIN, histogram.ABOVE_BIN
    )
    bins[a == 0] = histogram.ZERO_BIN
    bins[~torch.isfinite(a)] = histogram.NONFINITE_BIN
    return bins


def hist_negative(x: torch.Tensor) -> torch.Tensor:
    """Whether each element counts in the negative histogram: ``x < 0`` (never a zero or a
    NaN; ``-Inf`` is negative)."""
    return x.detach().to("cpu", torch.float64) < 0


def _hist_row(x: torch.Tensor, where: torch.Tensor | None = None) -> torch.Tensor:
    """log2 histogram of one tensor's elements (of those where ``where`` holds)."""
    bins = hist_bins(x) if where is None else hist_bins(x)[where]
    return torch.bincount(bins.reshape(-1), minlength=histogram.NUM_BINS)


def _unit_counts(x: torch.Tensor, feature_dim: int, threshold: float) -> tuple[int, int, int]:
    """(units, dead units, saturated units) along ``feature_dim`` of float64 ``x``."""
    units = x.shape[feature_dim]
    if units == 0:
        return 0, 0, 0
    per_unit = x.movedim(feature_dim, 0).reshape(units, -1)
    dead = int((~(per_unit > 0).any(dim=1)).sum())
    if math.isnan(threshold) or x.numel() == 0:
        return units, dead, 0
    saturated = int((per_unit.abs() >= threshold).all(dim=1).sum())
    return units, dead, saturated


def tensor_stats_reference(
    tensors: Sequence[torch.Tensor],
    *,
    feature_dim: int | Sequence[int | None] | None = None,
    saturation: float | Sequence[float | None] | None = None,
) -> dict[str, torch.Tensor]:
    """Same arguments, keys and meaning as :func:`torchvitals.tensor_stats`, on CPU in float64."""
    feature_dims = per_tensor(feature_dim, len(tensors), "feature_dim")
    thresholds = per_tensor(saturation, len(tensors), "saturation")
    rows: dict[str, list] = {key: [] for key in STAT_KEYS}
    for tensor, feature_dim, threshold in zip(tensors, feature_dims, thresholds, strict=True):
        x = tensor.detach().to("cpu", torch.float64)
        threshold = math.nan if threshold is None else float(threshold)
        finite = x[torch.isfinite(x)]
        rows["numel"].append(x.numel())
        rows["sum"].append(float(finite.sum()))
        rows["sumsq"].append(float((finite * finite).sum()))
        rows["max_abs"].append(float(finite.abs().max()) if finite.numel() else 0.0)
        rows["nan"].append(int(torch.isnan(x).sum()))
        rows["inf"].append(int(torch.isinf(x).sum()))
        rows["zeros"].append(int((x == 0).sum()))
        rows["saturated"].append(int((x.abs() >= threshold).sum()))
        rows["hist"].append(_hist_row(x))
        rows["neg_hist"].append(_hist_row(x, hist_negative(x)))
        units = (0, 0, 0) if feature_dim is None else _unit_counts(x, feature_dim, threshold)
        rows["units"].append(units[0])
        rows["dead_units"].append(units[1])
        rows["saturated_units"].append(units[2])

    out = {}
    for key, values in rows.items():
        if key in ("hist", "neg_hist"):
            out[key] = (
                torch.stack(values)
                if values
                else torch.zeros(0, histogram.NUM_BINS, dtype=torch.int64)
            )
        else:
            dtype = torch.float64 if key in ("sum", "sumsq", "max_abs") else torch.int64
            out[key] = torch.tensor(values, dtype=dtype)
    return out
