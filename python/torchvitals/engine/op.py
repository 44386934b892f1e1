"""``tensor_stats``: input checks and the ``torchvitals::tensor_stats_v2`` torch.library op.

The op runs on PyTorch's current stream with no host sync and works under
``torch.compile`` (it is opaque to Dynamo); :mod:`torchvitals.engine.dispatch` picks the
backend that computes it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from torchvitals.engine import histogram
from torchvitals.engine.arguments import per_tensor
from torchvitals.engine.contract import COUNT_KEYS, MOMENT_KEYS
from torchvitals.engine.dispatch import (
    DTYPE_CODES,
    NO_FEATURE,
    output_buffers,
    rectifiable,
    run_engine,
)

#: The op's name carries the version of its output layout (2: two histogram rows per tensor).
#: Inductor's FX graph cache keys compiled code on the graph, which names the op but not the
#: shapes of its outputs: under a new name, code compiled for an older layout (before a
#: torchvitals upgrade) is never replayed.
OP_NAME = "tensor_stats_v2"


def _check_tensor(index: int, t: object) -> int:
    """``t``'s device index (-1 on the CPU), once ``t`` is known to be something the
    engine reads. Runs on every tensor of every call: the cheap accessors only
    (``Tensor.device.type`` alone costs more than all of these)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"tensors[{index}] is a {type(t).__name__}, not a torch.Tensor")
    if t.layout != torch.strided:
        raise TypeError(f"tensors[{index}] has layout {t.layout}; only dense tensors are supported")
    if t.is_nested:  # a strided nested tensor has no single shape: no feature dim, no layout
        raise TypeError(
            f"tensors[{index}] is a nested tensor; pass its components instead (t.unbind())"
        )
    if t.dtype not in DTYPE_CODES:
        raise TypeError(
            f"tensors[{index}] has dtype {t.dtype}; supported: float32, float16, bfloat16, float64"
        )
    if not (t.is_cpu or t.is_cuda):
        if t.is_meta:
            raise ValueError(f"tensors[{index}] is on the meta device and holds no data")
        raise ValueError(f"tensors[{index}] is on {t.device}; supported devices: cpu, cuda")
    return t.get_device()


def _normalize_feature_dim(index: int, t: torch.Tensor, dim: int | None) -> int:
    if dim is None:
        return NO_FEATURE
    if isinstance(dim, bool) or not isinstance(dim, int):
        raise TypeError(f"feature_dim for tensors[{index}] must be an int or None, got {dim!r}")
    if not -t.dim() <= dim < t.dim():
        raise ValueError(
            f"feature_dim={dim} is out of range for tensors[{index}] of shape {tuple(t.shape)}"
        )
    return dim % t.dim()


def _normalize_threshold(index: int, value: float | None) -> float:
    if value is None:
        return math.nan  # |x| >= nan is false everywhere: the test is off
    value = float(value)
    if not value >= 0:
        raise ValueError(f"saturation for tensors[{index}] must be >= 0 or None, got {value}")
    return value


def _check_rectified_of(
    rectified_of: Sequence[int | None], tensors: list[torch.Tensor], dims: list[int],
    thresholds: list[float],
) -> list[int]:  # fmt: skip
    """``rectified_of`` as the engine's column (-1: none), once each entry is one it can use."""
    if len(rectified_of) != len(tensors):
        raise ValueError(f"rectified_of has {len(rectified_of)} entries for {len(tensors)} tensors")
    for i, j in enumerate(rectified_of):
        index = not isinstance(j, bool) and isinstance(j, int) and 0 <= j < len(tensors)
        if j is not None and not index:
            raise ValueError(f"rectified_of[{i}] must be None or a tensor index, got {j!r}")
    column = [-1 if j is None else j for j in rectified_of]
    for i, j in enumerate(column):
        if j < 0:
            continue
        layout = f"is not tensors[{j}]'s dtype, shape and layout"
        problems = (
            (not rectifiable(tensors[j], tensors[i]), layout),
            (thresholds[i] == thresholds[i], "has a saturation threshold"),
            (dims[j] != NO_FEATURE, f"would take the units of tensors[{j}]"),
            (column[j] >= 0, f"would come from tensors[{j}], itself derived"),
            (column.count(j) > 1, f"shares tensors[{j}] with another derived tensor"),
        )
        for failed, problem in problems:
            if failed:
                raise ValueError(f"rectified_of[{i}]={j}: tensors[{i}] {problem}")
    return column


def fused_stats(
    tensors: torch.Tensor | Sequence[torch.Tensor],
    *,
    feature_dim: int | Sequence[int | None] | None = None,
    saturation: float | Sequence[float | None] | None = None,
    rectified_of: Sequence[int | None] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The engine's raw outputs: ``moments [T, 3]`` (columns ``MOMENT_KEYS``, float64),
    ``counts [T, 8]`` (columns ``COUNT_KEYS``, int64) and ``hist [T, 2, B]`` (int64: every
    element, then the negative ones, by log2 bin of ``|x|``).

    ``rectified_of[i] = j`` is the caller's word that ``tensors[i]`` holds ``max(x, 0)`` of
    ``x = tensors[j]`` (a ReLU's output and its input): the CPU backend then takes row
    ``i`` from its pass over ``x``, bit for bit what reading ``tensors[i]`` would give, and
    never reads it; ``x``'s own sums are then summed run by run along ``tensors[i]``'s
    units, which changes their last bits only. A thread that flushes subnormals to zero
    (``torch.set_flush_denormal(True)``), the CUDA backend and compiled code read
    ``tensors[i]`` as any other tensor."""
    if isinstance(tensors, torch.Tensor):
        tensors = [tensors]
    tensors = list(tensors)
    device_index = None
    for i, t in enumerate(tensors):
        t_index = _check_tensor(i, t)
        if device_index is None:
            device_index = t_index
        elif t_index != device_index:
            raise ValueError(
                f"tensors[{i}] is on {t.device} but tensors[0] is on {tensors[0].device}"
            )
    dims = per_tensor(feature_dim, len(tensors), "feature_dim")
    thresholds = per_tensor(saturation, len(tensors), "saturation")
    dims = [
        _normalize_feature_dim(i, t, d) for i, (t, d) in enumerate(zip(tensors, dims, strict=True))
    ]
    thresholds = [_normalize_threshold(i, v) for i, v in enumerate(thresholds)]
    if rectified_of is not None:
        rectified_of = _check_rectified_of(rectified_of, tensors, dims, thresholds)
    if not tensors:
        return output_buffers(0, torch.device("cpu"), torch.zeros)
    if torch.compiler.is_compiling():  # the traced op has no autograd formula
        return getattr(torch.ops.torchvitals, OP_NAME)(
            [t.detach() for t in tensors], dims, thresholds
        )
    # Eager calls skip the dispatcher (about 0.1 ms a call) and need no detach: the engine
    # reads raw memory and its outputs are new tensors outside any graph.
    return run_engine(tensors, dims, thresholds, rectified_of)


def tensor_stats(
    tensors: torch.Tensor | Sequence[torch.Tensor],
    *,
    feature_dim: int | Sequence[int | None] | None = None,
    saturation: float | Sequence[float | None] | None = None,
) -> dict[str, torch.Tensor]:
    """Every statistic of each tensor, in one fused pass, without a host sync.

    Returns a dict of 1-d tensors with one entry per input (``hist`` and ``neg_hist`` are
    ``[T, B]``), on the inputs' device: ``numel, sum, sumsq, max_abs, nan, inf, zeros,
    saturated, hist, neg_hist, units, dead_units, saturated_units``. ``feature_dim`` and
    ``saturation`` take one value for all tensors or one per tensor. See the README for
    exact definitions.
    """
    moments, counts, hist = fused_stats(tensors, feature_dim=feature_dim, saturation=saturation)
    out = {key: counts[:, i] for i, key in enumerate(COUNT_KEYS)}
    out.update({key: moments[:, i] for i, key in enumerate(MOMENT_KEYS)})
    out["hist"] = hist[:, histogram.ALL_ROW]
    out["neg_hist"] = hist[:, histogram.NEGATIVE_ROW]
    return out


@torch.library.custom_op(f"torchvitals::{OP_NAME}", mutates_args=())
def _tensor_stats_op(
    tensors: list[torch.Tensor], feature_dims: list[int], saturation: list[float]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return run_engine(tensors, feature_dims, saturation)


@_tensor_stats_op.register_fake
def _(tensors, feature_dims, saturation):
    return output_buffers(len(tensors), tensors[0].device, torch.empty)
