"""``torchvitals export tensorboard RUN LOGDIR``: a recorded run as TensorBoard event files,
written with ``torch.utils.tensorboard.SummaryWriter`` (needs the ``tensorboard`` package).

What is written, per step (tags group in TensorBoard by what precedes the first ``/``):

* every scalar under its own name (``loss``, ``lr/group0``, ``grad_norm``, ...);
* per layer and kind (``grad``, ``act``, ``weight``, ``act_grad``): ``{kind}_norm/{layer}``
  (``sqrt(sumsq)``, finite elements), ``{kind}_max_abs/{layer}``, and
  ``{kind}_nonfinite/{layer}`` (NaN + Inf elements) for the series that had any; for
  activations where measured, ``act_dead_frac/{layer}`` (dead units / units, as in the
  report) and ``act_sat_frac/{layer}`` (saturated / elements);
* the histogram of each row as ``{kind}_hist/{layer}``, **on a log2|x| axis**: the bucket
  of ``2**k <= |x| < 2**(k+1)`` ends at ``k + 1``; finite values below ``2**MIN_EXP`` are the
  bucket ending at ``MIN_EXP``; exact zeros (log2 0 = -inf) are the bucket ending at
  ``MIN_EXP - 1``; values ``>= 2**(MAX_EXP + 1)`` the bucket ending at ``MAX_EXP + 2``. The
  buckets span the first to the last non-empty one, with their exact counts. NaN and Inf
  have no place on the axis: they are not in the histogram (``num`` counts finite
  values and zeros) and are the ``{kind}_nonfinite`` scalar; a row with nothing else has
  no histogram. ``sum`` and ``sum_squares`` (which TensorBoard does not plot) are computed
  from the bucket centres.

A run with one rank is written to ``LOGDIR``; with more, each rank to ``LOGDIR/rank{R}`` and
the rows merged across ranks (sharded parameters, ``rank == -1``) to ``LOGDIR/merged``.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from torchvitals.engine.histogram import MAX_EXP, MIN_EXP, NONFINITE_BIN, NUM_BINS
from torchvitals.store.reader import Run

__all__ = ["BUCKET_LIMITS", "export_tensorboard", "histogram_buckets"]

#: Right edges on the log2|x| axis of bins 0 .. NUM_BINS - 2 (the non-finite bin has none).
BUCKET_LIMITS = np.concatenate(
    [[MIN_EXP - 1, MIN_EXP], np.arange(MIN_EXP + 1, MAX_EXP + 2), [MAX_EXP + 2]]
).astype(np.float64)
assert BUCKET_LIMITS.size == NUM_BINS - 1 and NONFINITE_BIN == NUM_BINS - 1


def histogram_buckets(counts: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """``(limits, counts)`` of one row's finite bins, from the first to the last non-empty
    one; None when it has none."""
    finite = np.asarray(counts, np.int64)[: NUM_BINS - 1]
    used = np.flatnonzero(finite)
    if used.size == 0:
        return None
    lo, hi = used[0], used[-1] + 1
    return BUCKET_LIMITS[lo:hi], finite[lo:hi]


def _writer(logdir: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as exc:  # torch raises ImportError naming tensorboard when it is absent
        raise ModuleNotFoundError("tensorboard is not installed", name="tensorboard") from exc
    return SummaryWriter(log_dir=str(logdir), max_queue=10_000, flush_secs=3600)


def _decoded(table: pa.Table, name: str) -> list:
    col = table.column(name)
    if pa.types.is_dictionary(col.type):
        col = col.cast(pa.string())
    return col.to_pylist()


def _where(ranks: list[int], rank: int) -> str:
    if len(ranks) == 1:
        return "."
    return "merged" if rank == -1 else f"rank{rank}"


def _scalars(writer, table: pa.Table) -> int:
    steps, names, values = (_decoded(table, c) for c in ("step", "name", "value"))
    n = 0
    for step, name, value in zip(steps, names, values, strict=True):
        if value is not None:
            writer.add_scalar(name, value, step)
            n += 1
    return n


def _layers(writer, table: pa.Table) -> int:
    cols = {c: _decoded(table, c) for c in ("step", "layer", "kind", "numel", "nan", "inf")}
    for c in ("sumsq", "max_abs", "units", "dead_units", "saturated"):
        cols[c] = _decoded(table, c)
    bad: set[tuple[str, str]] = set()
    for layer, kind, nan, inf in zip(
        cols["layer"], cols["kind"], cols["nan"], cols["inf"], strict=True
    ):
        if (nan or 0) + (inf or 0):
            bad.add((layer, kind))
    n = 0
    for i, step in enumerate(cols["step"]):
        layer, kind = cols["layer"][i], cols["kind"][i]
        values = {}
        if cols["sumsq"][i] is not None:
            values[f"{kind}_norm/{layer}"] = float(np.sqrt(cols["sumsq"][i]))
        if cols["max_abs"][i] is not None:
            values[f"{kind}_max_abs/{layer}"] = cols["max_abs"][i]
        if (layer, kind) in bad:
            values[f"{kind}_nonfinite/{layer}"] = (cols["nan"][i] or 0) + (cols["inf"][i] or 0)
        units, dead = cols["units"][i], cols["dead_units"][i]
        if dead is not None and units:
            values[f"{kind}_dead_frac/{layer}"] = dead / units
        numel, sat = cols["numel"][i], cols["saturated"][i]
        if sat is not None and numel:
            values[f"{kind}_sat_frac/{layer}"] = sat / numel
        for tag, value in values.items():
            writer.add_scalar(tag, value, step)
        n += len(values)
    return n


def _histograms(writer, table: pa.Table) -> int:
    steps, layers, kinds = (_decoded(table, c) for c in ("step", "layer", "kind"))
    counts = table.column("counts").combine_chunks()
    flat = counts.values.to_numpy(zero_copy_only=False)  # offsets index the whole child array
    offsets = counts.offsets.to_numpy()
    n = 0
    for i, step in enumerate(steps):
        found = histogram_buckets(flat[offsets[i] : offsets[i + 1]])
        if found is None:
            continue
        limits, bucket = found
        centres = limits - 0.5
        writer.add_histogram_raw(
            f"{kinds[i]}_hist/{layers[i]}",
            min=float(limits[0] - 1),
            max=float(limits[-1]),
            num=int(bucket.sum()),
            sum=float((bucket * centres).sum()),
            sum_squares=float((bucket * centres**2).sum()),
            bucket_limits=limits.tolist(),
            bucket_counts=bucket.tolist(),
            global_step=step,
        )
        n += 1
    return n


def export_tensorboard(run: Run, logdir: str | os.PathLike[str]) -> dict[str, dict[str, int]]:
    """Writes ``run`` as TensorBoard event files under ``logdir`` (see the module
    docstring); returns ``{sub-directory: {"scalars": values, "histograms": n}}``.
    ``logdir`` must be new or empty, so that no earlier export mixes in."""
    root = Path(logdir)
    if root.exists() and (not root.is_dir() or any(root.iterdir())):
        raise ValueError(f"LOGDIR {root} is not an empty directory; choose a new one")
    ranks = sorted(
        {r for t in run.tables.values() for r in pc.unique(t.column("rank")).to_pylist()}
    )
    written = {}
    for rank in ranks:
        where = _where(ranks, rank)
        parts = {
            name: table.filter(pc.equal(table.column("rank"), rank))
            for name, table in run.tables.items()
        }
        writer = _writer(root / where)
        try:
            scalars = _scalars(writer, parts["scalars"]) + _layers(writer, parts["layers"])
            written[str(root / where)] = {
                "scalars": scalars,
                "histograms": _histograms(writer, parts["hist"]),
            }
        finally:
            writer.close()
    return written
