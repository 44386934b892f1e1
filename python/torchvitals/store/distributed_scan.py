"""The merge across ranks and the per-layer series on Dask: many machines, one run.

The step axis is cut into ranges; one task per range reads, on a Dask worker, every unit
(Parquet row group or stream segment, :mod:`torchvitals.store.scan`) whose steps overlap
the range, keeps the rows of the range, and merges all ranks' rows with the one merge,
:func:`torchvitals.store.merge.merge_ranks`, exactly as the single-machine scan merges a
step chunk. The merge only ever combines rows of one step, so the ranges' results,
concatenated in order, are ``load_run``'s tables. Workers read the files themselves
(the run directory must be visible to them at the same path: a shared file system), so
only merged rows, or only the rows the series use, travel to the client.

Dask is optional (the ``test`` extra installs it): importing this module does not need
it; the functions say so in one line when it is missing.

    from distributed import Client
    from torchvitals.analysis.runtables import series_from_run
    from torchvitals.store.distributed_scan import scan_run_distributed

    with Client(...) as client:
        run = scan_run_distributed("runs/exp1", client=client, partitions=64)
        step, loss, lr, series = series_from_run(run)    # same arrays as on one machine
        layers = merged_frame("runs/exp1", "layers")     # a dask.dataframe of merged rows
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Mapping
from pathlib import Path

import pyarrow as pa

from .merge import merge_ranks
from .reader import MergeFn
from .scan import SERIES_COLUMNS, RunScan, Unit, lowest_rank_rows, merge_pieces, read_unit
from .schema import empty_table

__all__ = ["DistributedRun", "merge_range", "merged_frame", "scan_run_distributed", "step_ranges"]


def _dask():
    try:
        import dask
    except ImportError as exc:
        raise ImportError(
            "torchvitals.store.distributed_scan needs Dask: pip install 'dask[distributed]' "
            "(or torchvitals' test extra)"
        ) from exc
    return dask


def step_ranges(units: list[Unit], partitions: int) -> list[tuple[int, int]]:
    """``partitions`` consecutive ``[lo, hi)`` step ranges covering every unit's steps,
    cut at units' smallest steps so that about as many units start in each."""
    if partitions < 1:
        raise ValueError(f"partitions={partitions}: expected at least 1")
    lows = sorted(u.min_step for u in units if u.min_step is not None)
    highs = [u.max_step for u in units if u.max_step is not None]
    if not lows or len(lows) < len(units):  # a unit without statistics: one range
        return [(-(1 << 62), 1 << 62)]
    cuts = sorted({lows[len(lows) * i // partitions] for i in range(1, partitions)} - {lows[0]})
    bounds = [lows[0], *cuts, max(highs) + 1]
    return list(itertools.pairwise(bounds))


def _overlaps(unit: Unit, lo: int, hi: int) -> bool:
    if unit.min_step is None or unit.max_step is None:
        return True
    return unit.min_step < hi and unit.max_step >= lo


def merge_range(
    table: str,
    units: list[Unit],
    lo: int,
    hi: int,
    manifests: Mapping[int, dict],
    columns: list[str] | None = None,
    series_only: bool = False,
    merge: MergeFn | None = None,
    where=None,
) -> tuple[pa.Table, list[str]]:
    """The merged rows of ``table`` with ``lo <= step < hi`` from ``units`` (run on a
    worker), and the messages to warn about (damage, the merge's warnings). With
    ``series_only``: only the rows the series use (:func:`scan.lowest_rank_rows` of the
    range: a rank dropped here is never the lowest of the whole run). ``where``: a
    filter applied to each unit's rows before merging, as in ``RunScan.chunks``."""
    pieces, messages = [], []
    for unit in units:
        rows, damage = read_unit(unit, columns)
        if damage is not None:
            messages.append(
                f"torchvitals: segment {unit.file} is truncated or corrupted: {damage.error}"
            )
        if where is not None:
            rows = where(rows)
        steps = rows.column("step").to_numpy()
        inside = (steps >= lo) & (steps < hi)
        if inside.any():
            pieces.append((unit.rank, unit.order, rows.filter(pa.array(inside))))
    if not pieces:
        out = empty_table(table)
        return (out.select(list(SERIES_COLUMNS)) if series_only else out), messages
    merged, warned = merge_pieces(table, pieces, manifests, merge)
    if series_only:
        merged = lowest_rank_rows([merged])
    return merged, messages + warned


class DistributedRun(RunScan):
    """A :class:`RunScan` whose tables are read and merged on Dask, one task per step
    range; ``series_from_run`` takes it like a scanned run."""

    def __init__(
        self, path: Path, *, client=None, partitions: int | None = None, merge=None
    ) -> None:
        super().__init__(path, merge=merge)
        self.client = client
        self.partitions = partitions

    def _compute(self, table: str, columns=None, series_only=False, where=None) -> list[pa.Table]:
        dask = _dask()
        units = self.units(table)
        if not units:
            return []
        workers = len(self.client.scheduler_info()["workers"]) if self.client else os.cpu_count()
        ranges = step_ranges(units, self.partitions or max(1, 4 * (workers or 1)))
        merge = None if self.merge is merge_ranks else self.merge
        tasks = [
            dask.delayed(merge_range)(
                table,
                [u for u in units if _overlaps(u, lo, hi)],
                lo,
                hi,
                self.manifests,
                columns,
                series_only,
                merge,
                where,
            )
            for lo, hi in ranges
        ]
        if self.client is not None:
            results = self.client.gather(self.client.compute(tasks))
        else:
            results = dask.compute(*tasks)
        for _rows, messages in results:
            self.warn(messages)
        return [rows for rows, _messages in results]

    def chunks(self, table: str, columns=None, where=None, progress=None):
        parts = self._compute(table, columns, where=where)
        for i, part in enumerate(parts):
            if progress is not None:
                progress(i + 1, len(parts))
            yield part

    def series_rows(self, progress=None) -> pa.Table:
        parts = self._compute("layers", list(SERIES_COLUMNS), series_only=True)
        if progress is not None:
            progress(len(parts), len(parts))
        return lowest_rank_rows(parts)


def scan_run_distributed(
    path: str | os.PathLike[str], *, client=None, partitions: int | None = None, merge=None
) -> DistributedRun:
    """Open the run directory ``path`` for reading on Dask (``client``: a
    ``distributed.Client``; None: Dask's current scheduler). ``partitions``: step ranges
    per table (default: four per worker)."""
    _dask()
    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(f"torchvitals run directory not found: {root}")
    return DistributedRun(root, client=client, partitions=partitions, merge=merge)


def _to_pandas(part: tuple[pa.Table, list[str]]):
    rows, _messages = part
    cols = {
        name: (
            rows[name].cast(pa.string()) if pa.types.is_dictionary(rows[name].type) else rows[name]
        )
        for name in rows.column_names
    }
    return pa.table(cols).to_pandas()


def merged_frame(path: str | os.PathLike[str], table: str, *, partitions: int = 16, merge=None):
    """``table`` of the run at ``path``, merged across ranks as ``load_run`` merges it, as
    a ``dask.dataframe.DataFrame`` with one partition per step range (labels as strings;
    rows within a partition in ``load_run``'s order)."""
    dask = _dask()
    import dask.dataframe as dd

    run = scan_run_distributed(path, partitions=partitions, merge=merge)
    units = run.units(table)
    ranges = step_ranges(units, partitions) if units else []
    parts = [
        dask.delayed(_to_pandas)(
            dask.delayed(merge_range)(
                table,
                [u for u in units if _overlaps(u, lo, hi)],
                lo,
                hi,
                run.manifests,
                None,
                False,
                merge,
            )
        )
        for lo, hi in ranges
    ]
    meta = _to_pandas((empty_table(table), []))
    if not parts:
        return dd.from_pandas(meta, npartitions=1)
    return dd.from_delayed(parts, meta=meta, verify_meta=False)
