"""Read a run in bounded memory: :func:`scan_run`, the lazy sibling of ``load_run``.

``load_run`` holds every table of every rank at once (about 4.5x the run's size on disk).
A :class:`RunScan` reads the same files, verified the same way, but streams each table in
*step chunks*: units (a row group of a Parquet segment, or a whole stream segment, at
most ``segment_bytes``) are read in the order of their smallest step, and the rows of
every step below the next unit's smallest step, all ranks together, are complete. Each
such chunk goes through the one merge, :func:`torchvitals.store.merge.merge_ranks`
(shards, restarts, incomplete steps: whatever its rules are), with the rows of each rank
in the order ``load_run`` concatenates them, so the merged rows are exactly
``load_run``'s, in the same order, chunk after chunk.

What a scan keeps: the merged ``scalars`` (small), and for the per-layer series only the
rows of each (layer, kind)'s lowest rank (what :mod:`torchvitals.analysis.runtables`
uses), in the columns it reads; a histogram query keeps one (layer, kind)'s rows.

The pieces are plain functions on picklable :class:`Unit` descriptions, so that
:mod:`torchvitals.store.distributed_scan` runs the same reading and merging on Dask
workers, one step range per task.
"""

from __future__ import annotations

import os
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from .compaction import open_parquet, read_row_group
from .integrity import Damage
from .layout import PARQUET, open_regular_file
from .merge import merge_ranks, whole_layer_rows
from .reader import (
    MAX_SEGMENT_BYTES,
    MergeFn,
    SegmentRecovery,
    _read_stream_segment,
    run_files,
    warn_damaged,
)
from .schema import REQUIRED, conform, dictionary_codes, empty_table

__all__ = [
    "SERIES_COLUMNS",
    "RunScan",
    "Unit",
    "list_units",
    "lowest_rank_rows",
    "merge_pieces",
    "read_unit",
    "scan_run",
]

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
#: ... or this many bytes, whichever comes first (a ``hist`` row holds ~1.3 KB of bins: a
#: chunk of 1M of them, with the merge's copies, took 4.4 GB).
CHUNK_BYTES = 64 << 20
#: Parquet files a scan keeps open.
_OPEN_FILES = 64
_UNKNOWN = -(1 << 62)


@dataclass(frozen=True)
class Unit:
    """One readable piece of a table: row group ``group`` of a Parquet segment, or a whole
    stream segment (``group`` 0); ``min_step``/``max_step`` from the footer's statistics
    (``None`` when it has none)."""

    table: str
    rank: int
    seg: int
    file: str
    fmt: str
    group: int
    min_step: int | None
    max_step: int | None

    @property
    def order(self) -> tuple[int, int]:
        """Where its rows come among its rank's (segments, then row groups, in order)."""
        return (self.seg, self.group)


#: A unit's rows, ready to merge: ``(rank, order, rows)``.
Piece = tuple[int, tuple[int, int], pa.Table]


def _steps(table: pa.Table) -> np.ndarray:
    return table.column("step").to_numpy()


def list_units(
    entries: Iterable[tuple[str, int, int, dict[str, Path]]],
    table: str,
    on_damage: Callable[[str, str, int, list[Damage], int], None],
) -> list[Unit]:
    """Every unit of ``table`` among ``entries`` (``reader.run_files``), sorted by smallest
    step (units without statistics first). Footers only for Parquet files; a stream
    segment is read (its steps are in no footer). Damage goes to ``on_damage(file, table,
    rank, damage, rows kept)``."""
    units = []
    for t, rank, seg, files in entries:
        if t != table:
            continue
        file = files.get(PARQUET)
        if file is not None:
            try:
                with open_regular_file(file, MAX_SEGMENT_BYTES) as source:
                    pf = open_parquet(source, table, str(file))
                    meta = pf.metadata
                    col = pf.schema_arrow.get_field_index("step")
            except (pa.ArrowException, OSError, ValueError, EOFError) as exc:
                if "arrows" not in files:
                    dmg = Damage(0, None, f"no readable Parquet footer: {exc}"[:300])
                    on_damage(str(file), table, rank, [dmg], 0)
                    continue
            else:
                for g in range(meta.num_row_groups):
                    stats = meta.row_group(g).column(col).statistics
                    known = stats is not None and stats.has_min_max
                    low, high = (stats.min, stats.max) if known else (None, None)
                    units.append(Unit(table, rank, seg, str(file), PARQUET, g, low, high))
                continue
        stream = files["arrows"]
        data, rec, _fp = _read_stream_segment(stream, table, rank)
        if rec is not None:
            on_damage(str(stream), table, rank, list(rec.damage), rec.rows)
        if data.num_rows:
            steps = _steps(data)
            low, high = int(steps.min()), int(steps.max())
            units.append(Unit(table, rank, seg, str(stream), "arrows", 0, low, high))
    return sorted(units, key=lambda u: _UNKNOWN if u.min_step is None else u.min_step)


class _Files:
    """Parquet files kept open by a reader (the least recently used closed first)."""

    def __init__(self) -> None:
        self._open: OrderedDict[str, tuple] = OrderedDict()

    def get(self, unit: Unit):
        got = self._open.pop(unit.file, None)
        if got is None:
            source = open_regular_file(unit.file, MAX_SEGMENT_BYTES)
            try:
                got = (source, open_parquet(source, unit.table, unit.file))
            except BaseException:
                source.close()
                raise
            while len(self._open) >= _OPEN_FILES:
                self._open.popitem(last=False)[1][0].close()
        self._open[unit.file] = got
        return got[1]

    def close(self) -> None:
        for source, _pf in self._open.values():
            source.close()
        self._open.clear()


def read_unit(
    unit: Unit, columns: list[str] | None = None, files: _Files | None = None
) -> tuple[pa.Table, Damage | None]:
    """A unit's rows, verified, with the table's whole schema (columns not in
    ``columns`` are null), and its damage (then the rows are empty)."""
    if unit.fmt != PARQUET:
        data, rec, _fp = _read_stream_segment(Path(unit.file), unit.table, unit.rank)
        return data, (rec.damage[0] if rec is not None and not data.num_rows else None)
    own = files is None
    files = files or _Files()
    try:
        pf = files.get(unit)
        present = pf.schema_arrow.names
        wanted = None
        if columns is not None:  # the required columns always (conform needs them)
            keys = ("step", "rank", *REQUIRED[unit.table], *columns)
            wanted = [c for c in dict.fromkeys(keys) if c in present]
        rows, damage = read_row_group(pf, unit.group, unit.table, wanted)
    except (pa.ArrowException, OSError, ValueError, EOFError) as exc:
        rows, damage = None, Damage(0, None, f"not read: {exc}"[:300])
    finally:
        if own:
            files.close()
    if damage is not None:
        return empty_table(unit.table), damage
    return conform(unit.table, rows), None


def merge_pieces(
    table: str, pieces: list[Piece], manifests: Mapping[int, dict], merge: MergeFn | None = None
) -> tuple[pa.Table, list[str]]:
    """The merged rows of complete steps: each rank's pieces in ``load_run``'s order, then
    ``merge`` (default ``merge_ranks``); and the warnings it gave (not re-emitted)."""
    per_rank: dict[int, list[pa.Table]] = {}
    for rank, _order, rows in sorted(pieces, key=lambda p: (p[0], p[1])):
        per_rank.setdefault(rank, []).append(rows)
    tables = {r: pa.concat_tables(ts) for r, ts in per_rank.items()}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        merged = (merge or merge_ranks)(table, tables, manifests)
    return merged, [str(w.message) for w in caught]


def lowest_rank_rows(chunks: Iterable[pa.Table]) -> pa.Table:
    """The rows of merged ``layers`` chunks (in step order) that the per-layer series use:
    for each (layer, kind), those of its lowest rank (merged rows, rank -1, first), in
    :data:`SERIES_COLUMNS`, in the chunks' order."""
    kept: list[tuple[pa.Table, np.ndarray]] = []
    ids: dict[tuple[str, str], int] = {}  # (layer, kind) -> series number
    best = np.zeros(0, dtype=np.int64)  # per series, the lowest rank seen
    for chunk in chunks:
        # a shard's part of a parameter is no layer's statistic
        chunk = whole_layer_rows(chunk).select(list(SERIES_COLUMNS))
        if not chunk.num_rows:
            continue
        lcodes, lnames = dictionary_codes(chunk.column("layer"))
        kcodes, knames = dictionary_codes(chunk.column("kind"))
        pair, where = np.unique(lcodes.astype(np.int64) * len(knames) + kcodes, return_inverse=True)
        labels = [(lnames[p // len(knames)], knames[p % len(knames)]) for p in pair.tolist()]
        for label in labels:
            ids.setdefault(label, len(ids))
        series = np.array([ids[label] for label in labels], dtype=np.int64)[where]
        if len(ids) > len(best):
            best = np.append(best, np.full(len(ids) - len(best), np.iinfo(np.int64).max))
        rank = chunk.column("rank").to_numpy().astype(np.int64)
        np.minimum.at(best, series, rank)
        mask = best[series] == rank
        kept.append((chunk.filter(pa.array(mask)), series[mask]))
    if not kept:
        return empty_table("layers").select(list(SERIES_COLUMNS))
    # a lower rank found later: drop the rows kept before it (one chunk copied at a time;
    # the result stays in chunks: its reader combines one column at a time)
    out = []
    for i, (part, s) in enumerate(kept):
        kept[i] = None
        out.append(part.filter(pa.array(best[s] == part.column("rank").to_numpy())))
    return pa.concat_tables(out).unify_dictionaries()


def _split(pending: list[Piece], below: int | None) -> tuple[list[Piece], list[Piece]]:
    """Pieces' rows with ``step < below`` (all of them when ``below`` is None), and the rest."""
    if below is None:
        return pending, []
    done, rest = [], []
    for rank, order, rows in pending:
        low = _steps(rows) < below
        if low.all():
            done.append((rank, order, rows))
        elif not low.any():
            rest.append((rank, order, rows))
        else:
            done.append((rank, order, rows.filter(pa.array(low))))
            rest.append((rank, order, rows.filter(pa.array(~low))))
    return done, rest


class RunScan:
    """A run opened for bounded-memory reading (see the module docstring). ``path``,
    ``manifests``, ``manifest``, ``ranks``, ``closed`` as on ``Run``; ``problems`` and
    ``recovery`` fill up as the files are read."""

    def __init__(self, path: Path, *, merge: MergeFn | None = None):
        self.path = path
        self.problems: list[str] = []
        self.recovery: list[SegmentRecovery] = []
        self.manifests, self.entries = run_files(path, self.problems)
        self.manifest = self.manifests[min(self.manifests)]
        self.ranks = sorted(set(self.manifests) | {e[1] for e in self.entries})
        self.merge = merge or merge_ranks
        self._scalars: pa.Table | None = None
        self._damaged: set[str] = set()

    @property
    def closed(self) -> bool:
        return all("closed_at" in m for m in self.manifests.values())

    def damaged(self, file: str, table: str, rank: int, damage: list[Damage], rows: int):
        """Record and warn about a damaged file (once per file)."""
        if file in self._damaged or not damage:
            return
        self._damaged.add(file)
        rec = SegmentRecovery(file, table, rank, 0, rows, damage[0].error, tuple(damage))
        self.recovery.append(rec)
        warn_damaged(self.problems, rec)

    def warn(self, messages: list[str]) -> None:
        """Warn about the merge's messages not warned about yet."""
        for text in messages:
            if text not in self.problems:
                self.problems.append(text)
                warnings.warn(text, RuntimeWarning, stacklevel=3)

    def units(self, table: str) -> list[Unit]:
        """The units of ``table``, in the order a scan reads them."""
        return list_units(self.entries, table, self.damaged)

    def chunks(
        self,
        table: str,
        columns: list[str] | None = None,
        where: Callable[[pa.Table], pa.Table] | None = None,
        progress: Progress | None = None,
    ) -> Iterator[pa.Table]:
        """The merged rows of ``table`` (as ``load_run`` gives them), in step chunks of
        about :data:`CHUNK_ROWS` rows or :data:`CHUNK_BYTES` bytes, in ``load_run``'s
        order. ``columns``: read only these (and the required ones) from Parquet files,
        the others are null;
        ``where``: a filter applied to each unit's rows before merging (it must keep or
        drop whole ``(layer, kind)`` series, e.g. one layer)."""
        units = self.units(table)
        files = _Files()
        pending: list[Piece] = []
        size = nbytes = 0
        try:
            for i, unit in enumerate(units):
                rows, damage = read_unit(unit, columns, files)
                if damage is not None:
                    self.damaged(unit.file, unit.table, unit.rank, [damage], 0)
                if where is not None:
                    rows = where(rows)
                if rows.num_rows:
                    pending.append((unit.rank, unit.order, rows))
                    size += rows.num_rows
                    nbytes += rows.nbytes
                if progress is not None:
                    progress(i + 1, len(units))
                nxt = units[i + 1].min_step if i + 1 < len(units) else None
                small = size < CHUNK_ROWS and nbytes < CHUNK_BYTES
                if i + 1 < len(units) and (nxt is None or small):
                    continue  # the next unit's steps are unknown, or the chunk is small
                done, pending = _split(pending, nxt)
                size = sum(p[2].num_rows for p in pending)
                nbytes = sum(p[2].nbytes for p in pending)
                if done:
                    merged, messages = merge_pieces(table, done, self.manifests, self.merge)
                    self.warn(messages)
                    yield merged
        finally:
            files.close()

    # ------------------------------------------------------------------ queries

    @property
    def scalars(self) -> pa.Table:
        """The merged ``scalars`` table (small: steps x names x ranks)."""
        if self._scalars is None:
            parts = list(self.chunks("scalars"))
            self._scalars = pa.concat_tables(parts) if parts else empty_table("scalars")
        return self._scalars

    def series_rows(self, progress: Progress | None = None) -> pa.Table:
        """The merged ``layers`` rows the per-layer series use (:func:`lowest_rank_rows`).
        Every column is read, so that damage anywhere in the table is found and reported
        (``layers`` is small next to ``hist``)."""
        return lowest_rank_rows(self.chunks("layers", progress=progress))

    def histogram(
        self, layer: str, kind: str, progress: Progress | None = None
    ) -> tuple[np.ndarray, np.ndarray] | None:
        """``(steps, counts)`` as :func:`torchvitals.analysis.summary.histogram_matrix`
        gives it for a loaded run, reading only this (layer, kind)'s rows."""
        return self.histograms([(layer, kind)], progress).get((layer, kind))

    def histograms(
        self, pairs: Iterable[tuple[str, str]], progress: Progress | None = None
    ) -> dict[tuple[str, str], tuple[np.ndarray, np.ndarray]]:
        """``{(layer, kind): (steps, counts)}`` for each of ``pairs`` that the run has, in
        one pass over ``hist`` keeping only their rows (as :meth:`histogram`)."""
        wanted = pa.array(sorted({f"{layer}\x00{kind}" for layer, kind in pairs}), pa.string())

        def key(rows: pa.Table) -> pa.ChunkedArray:
            return pc.binary_join_element_wise(
                pc.cast(rows["layer"], pa.string()), pc.cast(rows["kind"], pa.string()), "\x00"
            )

        def where(rows: pa.Table) -> pa.Table:
            return rows.filter(pc.is_in(key(rows), value_set=wanted))

        parts = [c for c in self.chunks("hist", where=where, progress=progress) if c.num_rows]
        if not parts:
            return {}
        rows = pa.concat_tables(parts)
        keys = key(rows).to_numpy(zero_copy_only=False)
        rank = rows["rank"].to_numpy()
        flat = rows["counts"].combine_chunks().flatten().to_numpy(zero_copy_only=False)
        counts = flat.reshape(rows.num_rows, -1).astype(np.float64)
        steps = rows["step"].to_numpy()
        out = {}
        for k in dict.fromkeys(keys.tolist()):
            mine = keys == k
            mine &= rank == rank[mine].min()  # the lowest rank: merged rows (-1) win
            layer, _, kind = k.partition("\x00")
            out[(layer, kind)] = (steps[mine], counts[mine].T)
        return out

    def histogram_rows(self, max_steps: int = 256, progress: Progress | None = None) -> pa.Table:
        """The merged ``hist`` rows of every ``(layer, kind)`` at no more than about
        ``max_steps`` of its steps: the run's step range is cut into ``max_steps`` equal
        bins and each series keeps every row of the first step it has in each bin. What a
        report draws (a few hundred columns per histogram) in memory bounded by the number
        of series, not by the run's length."""
        steps = self.scalars.column("step").to_numpy()
        lo, span = (int(steps.min()), int(steps.max() - steps.min()) + 1) if steps.size else (0, 1)
        chosen: dict[str, int] = {}  # series and step bin -> the step kept
        parts = []
        for chunk in self.chunks("hist", progress=progress):
            step = chunk.column("step").to_numpy()
            cell = np.clip((step - lo) * max_steps // span, 0, max_steps - 1)
            keys = pc.binary_join_element_wise(
                pc.cast(chunk["layer"], pa.string()),
                pc.cast(chunk["kind"], pa.string()),
                pa.array(cell.astype(str)),
                "\x00",
            ).to_numpy(zero_copy_only=False)
            unique, first, inverse = np.unique(keys, return_index=True, return_inverse=True)
            for key, i in zip(unique.tolist(), first.tolist(), strict=True):
                chosen.setdefault(key, int(step[i]))
            keep = step == np.array([chosen[k] for k in unique.tolist()], np.int64)[inverse]
            if keep.any():
                parts.append(chunk.filter(pa.array(keep)))
        return pa.concat_tables(parts) if parts else empty_table("hist")

    def __repr__(self) -> str:
        return f"RunScan({str(self.path)!r}, ranks={self.ranks}, closed={self.closed})"


def scan_run(path: str | os.PathLike[str], *, merge: MergeFn | None = None) -> RunScan:
    """Open the run directory ``path`` for bounded-memory reading (manifests read and
    checked now, the data as it is queried). Errors as ``load_run``'s."""
    root = Path(path)
    if not root.exists():
        raise FileNotFoundError(f"torchvitals run directory not found: {root}")
    if not root.is_dir():
        raise NotADirectoryError(f"not a torchvitals run directory (not a directory): {root}")
    return RunScan(root, merge=merge)
