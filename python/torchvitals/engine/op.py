"""``tensor_stats``: input checks, the ``torchvitals::tensor_stats`` torch.library op,
and the one place that picks a backend (C++ on CPU, CUDA on GPU).

The compiled engine receives raw pointers and an int64 descriptor table
(``csrc/stats.h``); torch allocates every buffer, so the op runs on PyTorch's current
stream with no host sync and works under ``torch.compile`` (it is opaque to Dynamo).
"""

from __future__ import annotations

import math
from array import array
from collections import OrderedDict
from collections.abc import Sequence

import torch

from torchvitals import _C
from torchvitals.engine import histogram
from torchvitals.engine.arguments import per_tensor
from torchvitals.engine.contract import COUNT_KEYS, MOMENT_KEYS

_DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.float64: 3}
_NO_FEATURE = -1


def _check_tensor(index: int, t: object) -> int:
    """``t``'s device index (-1 on the CPU), once ``t`` is known to be something the
    engine reads. Runs on every tensor of every call: the cheap accessors only
    (``Tensor.device.type`` alone costs more than all of these)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"tensors[{index}] is a {type(t).__name__}, not a torch.Tensor")
    if t.layout != torch.strided:
        raise TypeError(f"tensors[{index}] has layout {t.layout}; only dense tensors are supported")
    if t.dtype not in _DTYPE_CODES:
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
        return _NO_FEATURE
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


def fused_stats(
    tensors: torch.Tensor | Sequence[torch.Tensor],
    *,
    feature_dim: int | Sequence[int | None] | None = None,
    saturation: float | Sequence[float | None] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The engine's raw outputs: ``moments [T, 3]`` (columns ``MOMENT_KEYS``, float64),
    ``counts [T, 8]`` (columns ``COUNT_KEYS``, int64) and ``hist [T, B]`` (int64)."""
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
    if not tensors:
        return (
            torch.zeros(0, len(MOMENT_KEYS), dtype=torch.float64),
            torch.zeros(0, len(COUNT_KEYS), dtype=torch.int64),
            torch.zeros(0, histogram.NUM_BINS, dtype=torch.int64),
        )
    if torch.compiler.is_compiling():  # the traced op has no autograd formula
        return torch.ops.torchvitals.tensor_stats([t.detach() for t in tensors], dims, thresholds)
    # Eager calls skip the dispatcher (about 0.1 ms a call) and need no detach: the engine
    # reads raw memory and its outputs are new tensors outside any graph.
    return _tensor_stats(tensors, dims, thresholds)


def tensor_stats(
    tensors: torch.Tensor | Sequence[torch.Tensor],
    *,
    feature_dim: int | Sequence[int | None] | None = None,
    saturation: float | Sequence[float | None] | None = None,
) -> dict[str, torch.Tensor]:
    """Every statistic of each tensor, in one fused pass, without a host sync.

    Returns a dict of 1-d tensors with one entry per input (``hist`` is ``[T, B]``), on
    the inputs' device: ``numel, sum, sumsq, max_abs, nan, inf, zeros, saturated, hist,
    units, dead_units, saturated_units``. ``feature_dim`` and ``saturation`` take one
    value for all tensors or one per tensor. See the README for exact definitions.
    """
    moments, counts, hist = fused_stats(tensors, feature_dim=feature_dim, saturation=saturation)
    out = {key: counts[:, i] for i, key in enumerate(COUNT_KEYS)}
    out.update({key: moments[:, i] for i, key in enumerate(MOMENT_KEYS)})
    out["hist"] = hist
    return out


# --- the op ---------------------------------------------------------------------------


def _dense(t: torch.Tensor) -> bool:
    """Whether the elements fill ``numel`` consecutive slots in some order (no gaps, no
    overlaps): then the kernels can read the memory as it is."""
    if t.is_contiguous():
        return True
    expected = 1
    for size, stride in sorted(
        ((n, st) for n, st in zip(t.shape, t.stride(), strict=True) if n != 1), key=lambda d: d[1]
    ):
        if stride != expected:
            return size == 0
        expected *= size
    return True


def _descriptors(tensors: list[torch.Tensor], dims: list[int]) -> tuple[list[int], int, int]:
    """Flattened descriptor rows (csrc/stats.h ``DescCol``), total chunks, total units."""
    rows: list[int] = []
    chunks = units_total = 0
    for t, dim in zip(tensors, dims, strict=True):
        numel = t.numel()
        if dim == _NO_FEATURE:
            units, inner = 0, 1
        else:
            # Read in memory order, the element at offset i of a dense tensor belongs to
            # unit (i // stride) % size along the feature dim, whatever the layout.
            units, inner = t.shape[dim], max(t.stride(dim), 1)
        rows += (t.data_ptr(), numel, _DTYPE_CODES[t.dtype], inner, units, units_total, chunks)
        chunks += -(-numel // _C.CHUNK_ELEMS)
        units_total += units
    return rows, chunks, units_total


class _DeviceTables:
    """Descriptor tables already on the GPU, keyed by their contents.

    Parameters and gradients keep their addresses from step to step, so in steady
    state no host-to-device copy is issued at all, and after one warm-up call the op
    can be captured in a CUDA graph. Each entry keeps its pinned source alive too, so
    a copy captured on a miss stays valid for as long as the entry does.
    """

    def __init__(self, capacity: int = 64) -> None:
        self._tables: OrderedDict[tuple, tuple[torch.Tensor, ...]] = OrderedDict()
        self._captured: list[tuple[torch.Tensor, ...]] = []
        self._capacity = capacity

    def get(self, rows: list[int], thresholds: list[float], device: torch.device):
        key = (device, tuple(rows), tuple(thresholds))
        tables = self._tables.get(key)
        if tables is None:
            desc = torch.tensor(rows, dtype=torch.int64).view(-1, _C.DESC_COLS).pin_memory()
            sat = torch.tensor(thresholds, dtype=torch.float64).pin_memory()
            tables = (
                desc.to(device, non_blocking=True),
                sat.to(device, non_blocking=True),
                desc,
                sat,
            )
            if torch.cuda.is_current_stream_capturing():
                # A captured graph replays the copy from this pinned memory: keep it forever.
                self._captured.append(tables)
            self._tables[key] = tables
            if len(self._tables) > self._capacity:
                self._tables.popitem(last=False)
        else:
            self._tables.move_to_end(key)
        return tables[0], tables[1]


_device_tables = _DeviceTables()


def _tensor_stats(
    tensors: list[torch.Tensor], feature_dims: list[int], saturation: list[float]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    # Dense tensors in any layout (channels-last, transposed) are read in place, in memory
    # order; only views with gaps or overlaps cost a copy.
    tensors = [t if _dense(t) else t.detach().contiguous() for t in tensors]
    device = tensors[0].device
    rows, num_chunks, num_units = _descriptors(tensors, feature_dims)
    count = len(tensors)
    # The CUDA kernel adds into zeroed counts; the CPU one writes every entry itself.
    alloc = torch.zeros if device.type == "cuda" else torch.empty
    flags = torch.zeros(2, num_units, dtype=torch.uint8, device=device)
    moments = torch.empty(count, _C.MOMENT_COLS, dtype=torch.float64, device=device)
    counts = alloc(count, _C.COUNT_COLS, dtype=torch.int64, device=device)
    hist = alloc(count, histogram.NUM_BINS, dtype=torch.int64, device=device)
    flags_ptr = flags.data_ptr()  # row 0 at flags_ptr, row 1 num_units bytes further
    common = (flags_ptr, flags_ptr + num_units, moments.data_ptr(), counts.data_ptr())

    if device.type == "cuda":
        if not getattr(_C, "built_with_cuda", False):
            raise RuntimeError(
                "torchvitals was built without CUDA (no nvcc at build time); reinstall "
                "with nvcc on PATH or TORCHVITALS_CUDA=ON to get statistics of GPU tensors"
            )
        desc, sat = _device_tables.get(rows, saturation, device)
        partials = torch.empty(num_chunks, _C.MOMENT_COLS, dtype=torch.float64, device=device)
        with torch.cuda.device(device):
            stream = torch.cuda.current_stream(device).cuda_stream
            _C.tensor_stats_cuda(
                desc.data_ptr(), sat.data_ptr(), count, num_chunks, *common,
                hist.data_ptr(), partials.data_ptr(), stream,
            )  # fmt: skip
    else:
        # Plain arrays: the engine only reads them, during the call (a torch.tensor of a
        # list costs ten times more).
        desc, sat = array("q", rows), array("d", saturation)
        _C.tensor_stats_cpu(
            desc.buffer_info()[0], sat.buffer_info()[0], count, num_chunks, *common,
            hist.data_ptr(), torch.get_num_threads(),
        )  # fmt: skip
    return moments, counts, hist


_tensor_stats_op = torch.library.custom_op("torchvitals::tensor_stats", mutates_args=())(
    _tensor_stats
)


@_tensor_stats_op.register_fake
def _(tensors, feature_dims, saturation):
    count, device = len(tensors), tensors[0].device
    return (
        torch.empty(count, _C.MOMENT_COLS, dtype=torch.float64, device=device),
        torch.empty(count, _C.COUNT_COLS, dtype=torch.int64, device=device),
        torch.empty(count, histogram.NUM_BINS, dtype=torch.int64, device=device),
    )
