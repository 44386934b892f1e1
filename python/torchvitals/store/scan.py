"""Read a run in bounded memory: :func:`scan_run`, the lazy sibling of ``load_run``.

``load_run`` holds every table of every rank at once (about 4.5x the run's size on disk).
A :class:`RunScan` reads the same files, verified the same way, but streams each table in
*step chunks*: row groups (Parquet segments) or whole segments (streams, up to
``segment_bytes``) are read in the order of their smallest step, and the rows of every
step below the next unit's smallest step, all ranks together, are complete. Each such
chunk goes through the one merge, :func:`torchvitals.store.merge.merge_ranks` (shards,
restarts, incomplete steps: whatever its rules are), so the merged rows are exactly
``load_run``'s, in the same order, chunk after chunk.

What a scan keeps: the merged ``scalars`` (small), and for the per-layer series only the
rows of each (layer, kind)'s lowest rank (what :mod:`torchvitals.analysis.runtables`
uses), in the columns it reads; a histogram query keeps one (layer, kind)'s rows.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from .compaction import open_parquet, read_row_group
from .integrity import Damage
from .layout import PARQUET, read_regular_file
from .merge import merge_ranks
from .reader import (
    MAX_SEGMENT_BYTES,
    MergeFn,
    SegmentRecovery,
    _read_stream_segment,
    run_files,
    warn_damaged,
)
from .schema import conform, dictionary_codes, empty_table

__all__ = ["SERIES_COLUMNS", "RunScan", "scan_run"]

#: ``progress(done, total)``: units (row groups or stream segments) read of a table.
Progress = Callable[[int, int], None]
#: Columns of ``layers`` the per-layer series read.
SERIES_COLUMNS = (
    "step",
    "rank",
    "layer",
    "kind",
    "numel",
    "nan",
    "inf",
    "saturated",
    "units",
    "dead_units",
    "sumsq",
    "large",
)
#: A chunk is merged once it holds this many rows (or at the end).
CHUNK_ROWS = 1 << 20


class _Unit:
    """One readable piece of a table: a row group of a Parquet segment, or a stream segment."""

    __slots__ = ("file", "fmt", "group", "min_step", "rank", "seg", "table")

    def __init__(self, table, rank, seg, file, fmt, group, min_step):
        self.table, self.rank, self.seg, self.file = table, rank, seg, file
        self.fmt, self.group, self.min_step = fmt, group, min_step

    def order(self) -> tuple[int, int]:
        """Where its rows come in the rank's rows (segments, then row groups, in order)."""
        return (self.seg, self.group)


def _step_of(table: pa.Table) -> np.ndarray:
    return table.column("step").to_numpy()


class RunScan:
    """A run opened for bounded-memory reading (see the module docstring). ``path``,
    ``manifests``, ``manifest``, ``ranks``, ``closed`` as on ``Run``; ``problems`` and
    ``recovery`` fill up as the files are read."""

    def __init__(self, path: Path, *, merge: MergeFn | None = None):
        self.path = path
        self.problems: list[str] = []
        self.recovery: list[SegmentRecovery] = []
        self.manifests, self._entries = run_files(path, self.problems)
        self.manifest = self.manifests[min(self.manifests)]
        self.ranks = sorted(set(self.manifests) | {e[1] for e in self._entries})
        self._merge = merge or merge_ranks
        self._scalars: pa.Table | None = None
        self._damaged: set[str] = set()

    @property
    def closed(self) -> bool:
        return all("closed_at" in m for m in self.manifests.values())

    # ------------------------------------------------------------------ reading

    def _damage(self, file: Path, table: str, rank: int, damage: list[Damage], rows: int):
        if str(file) in self._damaged or not damage:
            return
        self._damaged.add(str(file))
        rec = SegmentRecovery(str(file), table, rank, 0, rows, damage[0].error, tuple(damage))
        self.recovery.append(rec)
        warn_damaged(self.problems, rec)

    def _units(self, table: str) -> list[_Unit]:
        """Every unit of ``table``, with its smallest step (footers only for Parquet)."""
        units = []
        for t, rank, seg, files in self._entries:
            if t != table:
                continue
            file = files.get(PARQUET)
            if file is not None:
                try:
                    pf = open_parquet(str(file), table, str(file))
                except (pa.ArrowException, OSError, ValueError, EOFError) as exc:
                    if "arrows" not in files:
                        dmg = Damage(0, None, f"no readable Parquet footer: {exc}"[:300])
                        self._damage(file, table, rank, [dmg], 0)
                        continue
                else:
                    col = pf.schema_arrow.get_field_index("step")
                    for g in range(pf.metadata.num_row_groups):
                        stats = pf.metadata.row_group(g).column(col).statistics
                        low = stats.min if stats is not None and stats.has_min_max else None
                        units.append(_Unit(table, rank, seg, file, PARQUET, g, low))
                    continue
            stream = files["arrows"]
            data, rec, _fp = _read_stream_segment(stream, table, rank)
            if rec is not None:
                self._damage(stream, table, rank, list(rec.damage), rec.rows)
            if data.num_rows:
                units.append(
                    _Unit(table, rank, seg, stream, "arrows", 0, int(_step_of(data).min()))
                )
        # a unit without statistics is read first: its smallest step is unknown
        return sorted(units, key=lambda u: -(2**62) if u.min_step is None else u.min_step)

    def _read(self, unit: _Unit, columns: list[str] | None) -> pa.Table:
        if unit.fmt == PARQUET:
            try:
                source = pa.BufferReader(read_regular_file(unit.file, MAX_SEGMENT_BYTES))
                pf = open_parquet(source, unit.table, str(unit.file))
                present = pf.schema_arrow.names
                wanted = None if columns is None else [c for c in columns if c in present]
                rows, damage = read_row_group(pf, unit.group, unit.table, wanted)
            except (pa.ArrowException, OSError, ValueError, EOFError) as exc:
                rows, damage = None, Damage(0, None, f"not read: {exc}"[:300])
            if damage is not None:
                self._damage(unit.file, unit.table, unit.rank, [damage], 0)
                return empty_table(unit.table)
            # the columns not read are null: the merge sees the table's whole schema
            return conform(unit.table, rows)
        data, _rec, _fp = _read_stream_segment(unit.file, unit.table, unit.rank)
        return data

    def chunks(
        self,
        table: str,
        columns: list[str] | None = None,
        where: Callable[[pa.Table], pa.Table] | None = None,
        progress: Progress | None = None,
    ) -> Iterator[pa.Table]:
        """The merged rows of ``table`` (as ``load_run`` gives them), in step chunks of
        about :data:`CHUNK_ROWS` rows, in ``load_run``'s order. ``columns``: read only
        these (``step``, ``rank`` and the merge's keys are added); ``where``: a filter
        applied to each unit's rows before merging (it must keep or drop whole
        ``(layer, kind)`` series, e.g. one layer)."""
        if columns is not None:
            need = ["step", "rank", *(("layer", "kind") if table != "scalars" else ("name",))]
            columns = list(dict.fromkeys([*need, *columns]))
        units = self._units(table)
        pending: list[tuple[int, tuple[int, int], pa.Table]] = []
        size = 0
        for i, unit in enumerate(units):
            rows = self._read(unit, columns)
            if where is not None:
                rows = where(rows)
            if rows.num_rows:
                pending.append((unit.rank, unit.order(), rows))
                size += rows.num_rows
            if progress is not None:
                progress(i + 1, len(units))
            nxt = units[i + 1].min_step if i + 1 < len(units) else None
            if nxt is None and i + 1 < len(units):
                continue  # no statistics: its steps are unknown
            if nxt is not None and size < CHUNK_ROWS:
                continue
            done, pending = _split(pending, nxt)
            size = sum(p[2].num_rows for p in pending)
            if done:
                yield self._merged(table, done)
        if pending:
            yield self._merged(table, pending)

    def _merged(self, table: str, pieces: list[tuple[int, tuple[int, int], pa.Table]]) -> pa.Table:
        per_rank: dict[int, list[pa.Table]] = {}
        for rank, _order, rows in sorted(pieces, key=lambda p: (p[0], p[1])):
            per_rank.setdefault(rank, []).append(rows)
        tables = {r: pa.concat_tables(ts) for r, ts in per_rank.items()}
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            merged = self._merge(table, tables, self.manifests)
        for w in caught:
            text = str(w.message)
            if text not in self.problems:
                self.problems.append(text)
                warnings.warn(w.message, stacklevel=3)
        return merged

    # ------------------------------------------------------------------ queries

    @property
    def scalars(self) -> pa.Table:
        """The merged ``scalars`` table (small: steps x names x ranks)."""
        if self._scalars is None:
            parts = list(self.chunks("scalars"))
            self._scalars = pa.concat_tables(parts) if parts else empty_table("scalars")
        return self._scalars

    def series_rows(self, progress: Progress | None = None) -> pa.Table:
        """The merged ``layers`` rows the per-layer series use: for each (layer, kind),
        the rows of its lowest rank (merged rows, rank -1, first), in
        :data:`SERIES_COLUMNS`, in ``load_run``'s order."""
        kept: list[tuple[pa.Table, np.ndarray]] = []
        ids: dict[tuple[str, str], int] = {}  # (layer, kind) -> series number
        best = np.zeros(0, dtype=np.int64)  # per series, the lowest rank seen
        for chunk in self.chunks("layers", list(SERIES_COLUMNS), progress=progress):
            chunk = chunk.select(list(SERIES_COLUMNS))
            lcodes, lnames = dictionary_codes(chunk.column("layer"))
            kcodes, knames = dictionary_codes(chunk.column("kind"))
            pair, where = np.unique(
                lcodes.astype(np.int64) * len(knames) + kcodes, return_inverse=True
            )
            for p in pair.tolist():
                ids.setdefault((lnames[p // len(knames)], knames[p % len(knames)]), len(ids))
            series = np.array(
                [ids[(lnames[p // len(knames)], knames[p % len(knames)])] for p in pair.tolist()],
                dtype=np.int64,
            )[where]
            if len(ids) > len(best):
                best = np.append(best, np.full(len(ids) - len(best), np.iinfo(np.int64).max))
            rank = chunk.column("rank").to_numpy().astype(np.int64)
            np.minimum.at(best, series, rank)
            mask = best[series] == rank
            kept.append((chunk.filter(pa.array(mask)), series[mask]))
        if not kept:
            return empty_table("layers").select(list(SERIES_COLUMNS))
        # a lower rank found later: drop the rows kept before it
        out = [
            part.filter(pa.array(best[series] == part.column("rank").to_numpy()))
            for part, series in kept
        ]
        return pa.concat_tables(out).unify_dictionaries().combine_chunks()

    def histogram(
        self, layer: str, kind: str, progress: Progress | None = None
    ) -> tuple[np.ndarray, np.ndarray] | None:
        """``(steps, counts)`` as :func:`torchvitals.analysis.summary.histogram_matrix`
        gives it for a loaded run, reading only this (layer, kind)'s rows."""

        def where(rows: pa.Table) -> pa.Table:
            return rows.filter(
                pc.and_(
                    pc.equal(pc.cast(rows["layer"], pa.string()), layer),
                    pc.equal(pc.cast(rows["kind"], pa.string()), kind),
                )
            )

        parts = [c for c in self.chunks("hist", where=where, progress=progress) if c.num_rows]
        if not parts:
            return None
        rows = pa.concat_tables(parts)
        rows = rows.filter(pc.equal(rows["rank"], pc.min(rows["rank"])))
        col = rows["counts"].combine_chunks()
        flat = col.flatten().to_numpy(zero_copy_only=False)
        counts = flat.reshape(rows.num_rows, -1).astype(np.float64)
        return rows["step"].to_numpy(), counts.T

    def __repr__(self) -> str:
        return f"RunScan({str(self.path)!r}, ranks={self.ranks}, closed={self.closed})"


def _split(
    pending: list[tuple[int, tuple[int, int], pa.Table]], below: int | None
) -> tuple[list, list]:
    """Pieces' rows with ``step < below`` (all of them when ``below`` is None), and the rest."""
    if below is None:
        return pending, []
    done, rest = [], []
    for rank, order, rows in pending:
        steps = _step_of(rows)
        low = steps < below
        if low.all():
            done.append((rank, order, rows))
        elif not low.any():
            rest.append((rank, order, rows))
        else:
            done.append((rank, order, rows.filter(pa.array(low))))
            rest.append((rank, order, rows.filter(pa.array(~low))))
    return done, rest


def scan_run(path: str | os.PathLike[str], *, merge: MergeFn | None = None) -> RunScan:
    """Open the run directory ``path`` for bounded-memory reading (manifests read and
    checked now, the data as it is queried). Errors as ``load_run``'s."""
    root = Path(path)
    if not root.exists():
        raise FileNotFoundError(f"torchvitals run directory not found: {root}")
    if not root.is_dir():
        raise NotADirectoryError(f"not a torchvitals run directory (not a directory): {root}")
    return RunScan(root, merge=merge)
