"""The one place that picks a backend (C++ on CPU, CUDA on GPU) and calls it.

The compiled engine receives raw pointers and an int64 descriptor table laid out as
``csrc/stats.h`` says (read by name through :mod:`torchvitals.engine.contract`); torch
allocates every buffer, so nothing here waits for the device.
"""

from __future__ import annotations

from array import array
from collections import OrderedDict
from collections.abc import Callable

import torch

from torchvitals import _C
from torchvitals.engine import histogram
from torchvitals.engine.contract import (
    CHUNK_ELEMS,
    COUNT_KEYS,
    DESC_COLUMNS,
    DTYPE_CODE_BY_NAME,
    MOMENT_KEYS,
)

#: ``{torch dtype: the engine's code}`` for every dtype the engine reads.
DTYPE_CODES: dict[torch.dtype, int] = {getattr(torch, n): c for n, c in DTYPE_CODE_BY_NAME.items()}
#: ``feature_dim`` of a tensor without feature units.
NO_FEATURE = -1

# Descriptor rows are filled by column name, in the order the engine reads them.
_DATA, _NUMEL, _DTYPE, _INNER, _UNITS, _FLAG_OFFSET, _CHUNK_BEGIN, _RECTIFIED_OF = (
    DESC_COLUMNS.index(name)
    for name in (
        "data",
        "numel",
        "dtype",
        "inner",
        "units",
        "flag_offset",
        "chunk_begin",
        "rectified_of",
    )
)
_ROW = [0] * len(DESC_COLUMNS)  # a tensor without feature units, read by its own pass
_ROW[_INNER] = 1
_ROW[_RECTIFIED_OF] = -1


def output_buffers(
    count: int, device: torch.device, alloc: Callable[..., torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``moments [T, len(MOMENT_KEYS)]`` float64, ``counts [T, len(COUNT_KEYS)]`` and
    ``hist [T, ROWS, NUM_BINS]`` int64 (every element, then the negative ones), allocated by
    ``alloc`` (``torch.empty`` or ``zeros``)."""
    return (
        alloc(count, len(MOMENT_KEYS), dtype=torch.float64, device=device),
        alloc(count, len(COUNT_KEYS), dtype=torch.int64, device=device),
        alloc(count, histogram.ROWS, histogram.NUM_BINS, dtype=torch.int64, device=device),
    )


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


def _readable(t: torch.Tensor) -> torch.Tensor:
    """``t``, or a copy the kernels can read as raw memory: a view with PyTorch's negation
    bit (``torch._neg_view``, the imaginary part of a conjugated complex tensor) holds
    ``-x`` in memory for ``x``, so it is resolved first (real dtypes carry no conjugation
    bit: complex tensors are refused before this)."""
    if t.is_neg():
        t = t.detach().resolve_neg()
    return t if _dense(t) else t.detach().contiguous()


def _descriptors(
    tensors: list[torch.Tensor], dims: list[int], rectified_of: list[int] | None
) -> tuple[list[int], int, int]:
    """Flattened descriptor rows (``DESC_COLUMNS``), total chunks, total units."""
    rows: list[int] = []
    chunks = units_total = 0
    for i, (t, dim) in enumerate(zip(tensors, dims, strict=True)):
        numel = t.numel()
        row = _ROW.copy()
        if dim != NO_FEATURE:
            # Read in memory order, the element at offset i of a dense tensor belongs to
            # unit (i // stride) % size along the feature dim, whatever the layout.
            row[_UNITS], row[_INNER] = t.shape[dim], max(t.stride(dim), 1)
        row[_DATA], row[_NUMEL], row[_DTYPE] = t.data_ptr(), numel, DTYPE_CODES[t.dtype]
        row[_FLAG_OFFSET], row[_CHUNK_BEGIN] = units_total, chunks
        if rectified_of is not None:
            row[_RECTIFIED_OF] = rectified_of[i]
        rows += row
        chunks += -(-numel // CHUNK_ELEMS)
        units_total += row[_UNITS]
    return rows, chunks, units_total


def rectifiable(x: torch.Tensor, y: torch.Tensor) -> bool:
    """Whether the engine can take the statistics of ``y``, which the caller knows to be
    ``max(x, 0)``, from its pass over ``x``: the same dtype, shape and memory layout, both
    read in place."""
    return (
        x is not y
        and x.dtype == y.dtype
        and x.device == y.device
        and x.shape == y.shape
        and x.stride() == y.stride()
        and _dense(x)
        and not x.is_neg()
        and not y.is_neg()
    )


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
            desc = torch.tensor(rows, dtype=torch.int64).view(-1, len(DESC_COLUMNS)).pin_memory()
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


def run_engine(
    tensors: list[torch.Tensor],
    feature_dims: list[int],
    saturation: list[float],
    rectified_of: list[int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``moments, counts, hist`` of checked, non-empty ``tensors`` on one device
    (``feature_dims``: a dim or ``NO_FEATURE``; ``saturation``: a threshold or NaN;
    ``rectified_of``: per tensor -1, or the index of a tensor it is ``max(x, 0)`` of, checked
    by :func:`rectifiable`: the CPU backend derives its row from that tensor's pass)."""
    # Dense tensors in any layout (channels-last, transposed) are read in place, in memory
    # order; only views with gaps or overlaps, and negated views, cost a copy.
    tensors = [_readable(t) for t in tensors]
    device = tensors[0].device
    # The CUDA kernel runs at memory bandwidth and reads every tensor itself.
    on_gpu = device.type == "cuda"
    rows, num_chunks, num_units = _descriptors(
        tensors, feature_dims, None if on_gpu else rectified_of
    )
    count = len(tensors)
    # The CUDA kernel adds into zeroed counts; the CPU one writes every entry itself.
    flags = torch.zeros(2, num_units, dtype=torch.uint8, device=device)
    moments, counts, hist = output_buffers(count, device, torch.empty)
    if on_gpu:
        counts.zero_()
        hist.zero_()
    flags_ptr = flags.data_ptr()  # row 0 at flags_ptr, row 1 num_units bytes further
    common = (flags_ptr, flags_ptr + num_units, moments.data_ptr(), counts.data_ptr())

    if on_gpu:
        if not getattr(_C, "built_with_cuda", False):
            raise RuntimeError(
                "torchvitals was built without CUDA (no nvcc at build time); reinstall "
                "with nvcc on PATH or TORCHVITALS_CUDA=ON to get statistics of GPU tensors"
            )
        desc, sat = _device_tables.get(rows, saturation, device)
        partials = torch.empty(num_chunks, len(MOMENT_KEYS), dtype=torch.float64, device=device)
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
