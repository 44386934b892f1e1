"""Read a torchvitals run directory back: :func:`load_run` and :class:`Run`.

Only pyarrow's IPC stream reader touches the data files and ``json`` the
manifests: nothing is unpickled or executed. Segments cut short by a crash are
read up to their last complete record batch and reported (``Run.recovery`` and
a warning), never raised.

Loading is two steps so that an exact merge of per-rank shards can replace the
default later: every table is first read *per rank* (``dict[rank, pa.Table]``,
segments in order), then ``merge(table_name, per_rank, manifests)`` turns those
into the one table exposed on the ``Run``. The default,
:func:`torchvitals.store.merge.merge_ranks`, combines the shards of sharded parameters into
one row per parameter (``rank = -1``) and keeps every other row per rank;
:func:`concat_ranks` only concatenates the ranks, sorted stably by ``(step, rank)``.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from .layout import MANIFEST_RE, SEGMENT_RE
from .merge import concat_ranks, merge_ranks
from .schema import SCHEMA_VERSION, SCHEMAS, conform, empty_table

__all__ = ["MergeFn", "Run", "SchemaVersionError", "SegmentRecovery", "concat_ranks", "load_run"]


#: ``merge(table_name, {rank: table}, {rank: manifest}) -> table``
MergeFn = Callable[[str, Mapping[int, pa.Table], Mapping[int, dict]], pa.Table]


class SchemaVersionError(ValueError):
    """The run was written by a newer torchvitals schema than this reader knows."""


@dataclass(frozen=True)
class SegmentRecovery:
    """A segment that could not be read to its end (truncated by a crash, or corrupted)."""

    file: str  #: path of the segment
    table: str
    rank: int
    batches: int  #: complete record batches recovered (and included in the run)
    rows: int  #: rows in those batches
    error: str  #: what stopped the reader


def _newer_message(path: Path, version: int) -> str:
    return (
        f"{path}: written with torchvitals schema version {version}, newer than the newest "
        f"version this torchvitals can read ({SCHEMA_VERSION}); upgrade torchvitals to read it"
    )


def _read_manifest(path: Path) -> dict:
    try:
        text = path.read_text(encoding="utf-8")
        obj = json.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: not a valid torchvitals manifest (not JSON: {exc})") from exc
    if not isinstance(obj, dict):
        raise ValueError(
            f"{path}: not a valid torchvitals manifest "
            f"(expected a JSON object, got {type(obj).__name__})"
        )
    version = obj.get("schema_version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise ValueError(
            f"{path}: not a valid torchvitals manifest (schema_version missing or not an integer)"
        )
    if version > SCHEMA_VERSION:
        raise SchemaVersionError(_newer_message(path, version))
    return obj


def _read_segment(path: Path, table: str, rank: int) -> tuple[pa.Table, SegmentRecovery | None]:
    """All complete record batches of one stream segment, conformed to the current schema."""
    batches: list[pa.RecordBatch] = []
    error: str | None = None
    schema: pa.Schema | None = None
    try:
        with pa.OSFile(str(path), "rb") as f:
            reader = pa.ipc.open_stream(f)
            schema = reader.schema
            meta = schema.metadata or {}
            v = meta.get(b"torchvitals.schema_version")
            if v is not None and v.isdigit() and int(v) > SCHEMA_VERSION:
                raise SchemaVersionError(_newer_message(path, int(v)))
            while True:
                try:
                    batches.append(reader.read_next_batch())
                except StopIteration:
                    break
    except SchemaVersionError:
        raise
    except (pa.ArrowException, OSError, ValueError) as exc:
        error = f"{type(exc).__name__}: {exc}"
    table_data = empty_table(table)
    if batches:
        try:
            table_data = conform(table, pa.Table.from_batches(batches, schema=schema))
        except ValueError as exc:
            error = f"{type(exc).__name__}: {exc}"
            batches = []
    if error is None:
        return table_data, None
    rec = SegmentRecovery(
        str(path), table, rank, len(batches), table_data.num_rows if batches else 0, error
    )
    return table_data, rec


class Run:
    """A loaded run: one pyarrow Table per table (all ranks), plus the manifests."""

    def __init__(
        self,
        path: Path,
        manifests: dict[int, dict],
        tables: dict[str, pa.Table],
        per_rank: dict[str, dict[int, pa.Table]],
        recovery: list[SegmentRecovery],
    ):
        self.path = path
        self.manifests = manifests  #: ``{rank: manifest}``
        self.ranks = sorted(set(manifests) | {r for t in per_rank.values() for r in t})
        self.manifest = manifests[min(manifests)]  #: rank 0's manifest (lowest rank present)
        self.tables = tables  #: ``{table name: pa.Table}``
        self.per_rank = per_rank  #: ``{table name: {rank: pa.Table}}`` before merging
        self.recovery = recovery  #: segments that were truncated or corrupted

    # tables ------------------------------------------------------------------
    @property
    def scalars(self) -> pa.Table:
        return self.tables["scalars"]

    @property
    def layers(self) -> pa.Table:
        return self.tables["layers"]

    @property
    def hist(self) -> pa.Table:
        return self.tables["hist"]

    def table(self, name: str) -> pa.Table:
        try:
            return self.tables[name]
        except KeyError:
            raise KeyError(f"no table {name!r} in run; tables: {', '.join(self.tables)}") from None

    def to_polars(self, name: str):
        """The table as a ``polars.DataFrame`` (dictionary columns become ``Categorical``)."""
        import polars as pl

        return pl.from_arrow(self.table(name))

    def to_pandas(self, name: str):
        """The table as a ``pandas.DataFrame`` (dictionary columns become ``category``)."""
        return self.table(name).to_pandas()

    # convenience -------------------------------------------------------------
    @property
    def closed(self) -> bool:
        """Whether every rank closed its writer (manifest has ``closed_at``)."""
        return all("closed_at" in m for m in self.manifests.values())

    def scalar_names(self) -> list[str]:
        names = self.scalars.column("name").cast(pa.string())
        return sorted(pc.unique(names).to_pylist())

    def scalar(self, name: str, rank: int | None = 0) -> tuple[np.ndarray, np.ndarray]:
        """``(steps, values)`` of scalar ``name`` for ``rank``.

        ``rank=None``: all ranks, ordered by step then rank.
        """
        t = self.scalars
        mask = pc.equal(t.column("name").cast(pa.string()), name)
        if rank is not None:
            mask = pc.and_(mask, pc.equal(t.column("rank"), rank))
        sel = t.filter(mask)
        if sel.num_rows == 0 and name not in self.scalar_names():
            raise KeyError(f"no scalar {name!r} in run {self.path}; scalars: {self.scalar_names()}")
        steps = sel.column("step").to_numpy()
        values = sel.column("value").to_numpy(zero_copy_only=False)
        return steps, values

    def __repr__(self) -> str:
        rows = ", ".join(f"{k}={v.num_rows}" for k, v in self.tables.items())
        return f"Run({str(self.path)!r}, ranks={self.ranks}, {rows}, closed={self.closed})"


def load_run(path: str | os.PathLike[str], *, merge: MergeFn | None = None) -> Run:
    """Load a run directory written by :class:`torchvitals.store.writer.RunWriter`.

    ``merge`` combines the per-rank tables of each table name (default
    :func:`torchvitals.store.merge.merge_ranks`). Raises ``FileNotFoundError`` (no directory / no
    manifest), ``ValueError`` (unreadable manifest) or ``SchemaVersionError``
    (a ``ValueError``: the run is newer than this reader). Truncated or corrupted
    segments are read up to their last complete record batch, recorded in
    ``Run.recovery`` and reported with a warning.
    """
    root = Path(path)
    if not root.exists():
        raise FileNotFoundError(f"torchvitals run directory not found: {root}")
    if not root.is_dir():
        raise NotADirectoryError(f"not a torchvitals run directory (not a directory): {root}")
    manifests: dict[int, dict] = {}
    segments: list[tuple[str, int, int, Path]] = []
    for entry in sorted(root.iterdir()):
        m = MANIFEST_RE.match(entry.name)
        if m:
            manifests[int(m["rank"])] = _read_manifest(entry)
            continue
        m = SEGMENT_RE.match(entry.name)
        if m and m["table"] in SCHEMAS and entry.is_file():
            segments.append((m["table"], int(m["rank"]), int(m["seg"]), entry))
    if not manifests:
        raise FileNotFoundError(f"not a torchvitals run directory (no manifest.rank*.json): {root}")

    recovery: list[SegmentRecovery] = []
    parts: dict[str, dict[int, list[pa.Table]]] = {t: {} for t in SCHEMAS}
    for table, rank, _seg, file in sorted(segments, key=lambda s: (s[0], s[1], s[2])):
        data, rec = _read_segment(file, table, rank)
        if rec is not None:
            recovery.append(rec)
            warnings.warn(
                f"torchvitals: segment {file} is truncated or corrupted ({rec.error}); "
                f"recovered {rec.batches} complete record batch(es), {rec.rows} row(s)",
                RuntimeWarning,
                stacklevel=2,
            )
        parts[table].setdefault(rank, []).append(data)

    per_rank = {
        t: {r: pa.concat_tables(ts) if len(ts) > 1 else ts[0] for r, ts in ranks.items()}
        for t, ranks in parts.items()
    }
    merge_fn = merge or merge_ranks
    tables = {t: merge_fn(t, per_rank[t], manifests) for t in SCHEMAS}
    return Run(root, manifests, tables, per_rank, recovery)
