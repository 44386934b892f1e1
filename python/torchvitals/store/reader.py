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

import contextlib
import os
import stat
import warnings
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .compaction import parquet_row_groups, source_checksums, types_mismatch
from .integrity import Damage, read_stream, with_checksum_flag
from .layout import (
    PARQUET,
    STREAM,
    NotRegularFileError,
    looks_like_run_file,
    parse_manifest_name,
    parse_segment_file,
    parse_segment_name,
    read_regular_file,
    segment_name,
)
from .manifest_check import (
    MAX_MANIFEST_BYTES,
    ManifestError,
    SchemaVersionError,
    check_manifest,
    newer_message,
)
from .merge import concat_ranks, merge_ranks
from .schema import REQUIRED, SCHEMA_VERSION, SCHEMAS, conform, empty_table

__all__ = [
    "Damage",
    "ManifestError",
    "MergeFn",
    "Run",
    "RunFile",
    "SchemaVersionError",
    "SegmentRecovery",
    "concat_ranks",
    "list_run_files",
    "load_run",
    "read_segment_file",
]


#: ``merge(table_name, {rank: table}, {rank: manifest}) -> table``
MergeFn = Callable[[str, Mapping[int, pa.Table], Mapping[int, dict]], pa.Table]

#: Segments larger than this are not read (the writer rotates at 256 MiB by default).
MAX_SEGMENT_BYTES = 16 << 30


@dataclass(frozen=True)
class SegmentRecovery:
    """A segment that could not be read whole (truncated by a crash, or damaged)."""

    file: str  #: path of the segment
    table: str
    rank: int
    batches: int  #: intact record batches (Parquet: row groups) recovered and included
    rows: int  #: rows in those batches
    error: str  #: what stopped the reader first
    #: every part not read: ``Damage(offset, rows, error)``; ``rows`` is None when unknown
    damage: tuple[Damage, ...] = ()

    @property
    def rows_lost(self) -> int | None:
        """Rows in the batches skipped; None when some skipped part's size is unknown."""
        rows = [d.rows for d in self.damage]
        return None if any(r is None for r in rows) else sum(rows)

    def describe(self) -> str:
        parts = []
        for d in self.damage[:4]:
            lost = "unknown rows" if d.rows is None else f"{d.rows} row(s)"
            parts.append(f"at byte {d.offset}: {lost} lost ({d.error})")
        more = f"; and {len(self.damage) - 4} more" if len(self.damage) > 4 else ""
        return "; ".join(parts) + more


def _read_manifest(path: Path, rank: int) -> tuple[dict, list[str]]:
    try:
        text = read_regular_file(path, MAX_MANIFEST_BYTES)
    except (OSError, ValueError) as exc:
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise ManifestError(f"{path}: not a readable torchvitals manifest ({why})") from exc
    return check_manifest(text, path, rank)


def _not_read(path: Path, table: str, rank: int, exc: BaseException) -> tuple:
    why = exc.strerror if isinstance(exc, NotRegularFileError) else f"{type(exc).__name__}: {exc}"
    damage = (Damage(0, None, f"not read: {why}"),)
    return empty_table(table), SegmentRecovery(str(path), table, rank, 0, 0, why, damage), ()


def _assemble(
    path: Path, table: str, rank: int, schema: pa.Schema | None, parts: list, damage: list
) -> tuple[pa.Table, SegmentRecovery | None]:
    """The rows kept of one segment (record batches or row groups), conformed, with its
    damage: what :func:`read_segment_file` returns."""
    table_data = empty_table(table)
    if parts:
        try:
            if isinstance(parts[0], pa.RecordBatch):
                joined = pa.Table.from_batches(parts, schema=schema)
            else:
                joined = pa.concat_tables(parts)
            table_data = conform(table, joined)
            for name in (*REQUIRED[table], "rank"):
                if table_data.column(name).null_count:
                    raise ValueError(f"required column {name!r} holds nulls")
        except (ValueError, pa.ArrowException) as exc:
            damage += [Damage(0, p.num_rows, f"{type(exc).__name__}: {exc}") for p in parts]
            parts.clear()
            table_data = empty_table(table)
    if not damage:
        return table_data, None
    damage.sort(key=lambda d: d.offset)
    units = len(parts)
    rec = SegmentRecovery(
        str(path), table, rank, units, table_data.num_rows, damage[0].error, tuple(damage)
    )
    return table_data, rec


def _read_stream_segment(
    path: Path, table: str, rank: int
) -> tuple[pa.Table, SegmentRecovery | None, tuple]:
    """Every intact record batch of one stream segment, conformed to the current schema;
    the damage, if any; and the segment's fingerprint (to refuse duplicated segments)."""
    try:
        data = read_regular_file(path, MAX_SEGMENT_BYTES)
    except (OSError, ValueError) as exc:
        return _not_read(path, table, rank, exc)
    contents = read_stream(data, with_checksum_flag(SCHEMAS[table]))
    damage = list(contents.damage)
    schema = contents.schema
    batches = contents.batches
    if schema is not None:
        meta = schema.metadata or {}
        v = meta.get(b"torchvitals.schema_version")
        if v is not None and v.isdigit() and int(v) > SCHEMA_VERSION:
            raise SchemaVersionError(newer_message(path, int(v)))
        named = meta.get(b"torchvitals.table")
        why = None
        if named is not None and named != table.encode():
            why = f"the segment holds table {named.decode('utf-8', 'replace')!r}, not {table!r}"
        elif not contents.checksummed:
            why = types_mismatch(table, schema)
        if why is not None and batches:
            damage += [Damage(0, b.num_rows, why) for b in batches]
            batches = []
    table_data, rec = _assemble(path, table, rank, schema, batches, damage)
    fingerprint = (table, rank, tuple(contents.checksums)) if table_data.num_rows else ()
    return table_data, rec, fingerprint


def _read_parquet_segment(
    path: Path, table: str, rank: int
) -> tuple[pa.Table, SegmentRecovery | None, tuple]:
    """Every intact row group of one compacted (Parquet) segment, like
    :func:`_read_stream_segment`."""
    try:
        data = read_regular_file(path, MAX_SEGMENT_BYTES)
    except (OSError, ValueError) as exc:
        return _not_read(path, table, rank, exc)
    parts, damage = [], []
    for rows, hurt in parquet_row_groups(pa.BufferReader(data), table, str(path)):
        if hurt is not None:
            damage.append(hurt)
        else:
            parts.append(rows)
    table_data, rec = _assemble(path, table, rank, None, parts, damage)
    fingerprint = ()
    if table_data.num_rows:
        with contextlib.suppress(pa.ArrowException, OSError, ValueError):
            sums = source_checksums(pq.read_metadata(pa.BufferReader(data)).metadata)
            fingerprint = (table, rank, sums) if sums else ()
    return table_data, rec, fingerprint


def _read_one(path: Path, table: str, rank: int, fmt: str) -> tuple:
    read = _read_parquet_segment if fmt == PARQUET else _read_stream_segment
    return read(path, table, rank)


def _read_segment(
    table: str, rank: int, files: dict[str, Path]
) -> tuple[Path, pa.Table, SegmentRecovery | None, tuple]:
    """One segment number, present as a stream, a Parquet file, or both (a compaction
    cut short, or under way): the Parquet file when it is intact, otherwise whichever of
    the two holds more intact rows. Never both: no row is counted twice."""
    if PARQUET in files:
        path = files[PARQUET]
        got = _read_parquet_segment(path, table, rank)
        if got[1] is None or STREAM not in files:
            return (path, *got)
        other = _read_stream_segment(files[STREAM], table, rank)
        if other[0].num_rows > got[0].num_rows:
            return (files[STREAM], *other)
        return (path, *got)
    path = files[STREAM]
    got = _read_stream_segment(path, table, rank)
    if got[1] is not None and not got[0].num_rows and not os.path.lexists(path):
        # compacted (and removed) by the live writer since the directory was listed
        parquet = path.with_name(segment_name(table, rank, _seg_of(path), PARQUET))
        if os.path.lexists(parquet):
            return (parquet, *_read_parquet_segment(parquet, table, rank))
    return (path, *got)


def _seg_of(path: Path) -> int:
    parsed = parse_segment_name(path.name)
    return parsed[2] if parsed else 0


def _read_segments(entries: list[tuple[str, int, int, dict[str, Path]]]) -> Iterator[tuple]:
    """``_read_segment`` of each segment, in order. Segments are read on threads (pyarrow's
    validation and the checksum release the GIL), at most two ahead of the caller so that
    only a few segments are in memory at once."""
    workers = min(len(entries), os.cpu_count() or 1, 4)
    if workers <= 1:
        yield from (_read_segment(table, rank, files) for table, rank, _seg, files in entries)
        return
    with ThreadPoolExecutor(workers, thread_name_prefix="torchvitals-reader") as pool:
        ahead: deque[Future] = deque()
        for table, rank, _seg, files in entries:
            ahead.append(pool.submit(_read_segment, table, rank, files))
            if len(ahead) > workers + 1:
                yield ahead.popleft().result()
        while ahead:
            yield ahead.popleft().result()


@dataclass(frozen=True)
class RunFile:
    """A file of a run directory, by its exact name (:func:`list_run_files`)."""

    path: Path
    kind: str  #: ``"manifest"`` or ``"segment"``
    rank: int
    table: str | None = None  #: segments only
    seg: int | None = None  #: segments only
    format: str | None = None  #: segments only: ``"arrows"`` (a stream) or ``"parquet"``


def list_run_files(path: str | os.PathLike[str]) -> list[RunFile]:
    """The manifests and segments of the run directory ``path``, exact names of known
    tables only (copies such as ``scalars.rank0.0.arrows`` are left out), manifests
    first (by rank), then segments by ``(table, rank, seg, format)``.

    A segment number can be listed in both formats while its compaction is under way
    (or after a crash in it): :func:`read_segment_file` either, but count one of them,
    the ``.parquet`` when it reads without damage (what :func:`load_run` does)."""
    root = Path(path)
    manifests, segments = [], []
    for name in os.listdir(root):
        rank = parse_manifest_name(name)
        if rank is not None:
            manifests.append(RunFile(root / name, "manifest", rank))
            continue
        parsed = parse_segment_file(name)
        if parsed is not None and parsed[0] in SCHEMAS:
            table, rank, seg, fmt = parsed
            segments.append(RunFile(root / name, "segment", rank, table, seg, fmt))
    manifests.sort(key=lambda f: f.rank)
    segments.sort(key=lambda f: (f.table, f.rank, f.seg, f.format))
    return manifests + segments


def read_segment_file(path: str | os.PathLike[str]) -> tuple[pa.Table, SegmentRecovery | None]:
    """The rows of one segment file (a stream or a compacted Parquet file), every batch
    or row group verified, conformed to the current schema; and its damage (``None``
    when whole). The table and rank come from the file's exact name (``ValueError``
    naming the file otherwise); damage is reported, never raised;
    ``SchemaVersionError`` for a segment newer than this reader."""
    file = Path(path)
    parsed = parse_segment_file(file.name)
    if parsed is None or parsed[0] not in SCHEMAS:
        raise ValueError(
            f"{file}: not a torchvitals segment name ({{table}}.rank{{R}}.{{seg:06d}}.arrows "
            f"or .parquet, table one of {', '.join(SCHEMAS)})"
        )
    table, rank, _seg, fmt = parsed
    data, rec, _fingerprint = _read_one(file, table, rank, fmt)
    return data, rec


class Run:
    """A loaded run: one pyarrow Table per table (all ranks), plus the manifests."""

    def __init__(
        self,
        path: Path,
        manifests: dict[int, dict],
        tables: dict[str, pa.Table],
        per_rank: dict[str, dict[int, pa.Table]],
        recovery: list[SegmentRecovery],
        problems: list[str] | None = None,
    ):
        self.path = path
        self.manifests = manifests  #: ``{rank: manifest}``
        self.ranks = sorted(set(manifests) | {r for t in per_rank.values() for r in t})
        self.manifest = manifests[min(manifests)]  #: rank 0's manifest (lowest rank present)
        self.tables = tables  #: ``{table name: pa.Table}``
        self.per_rank = per_rank  #: ``{table name: {rank: pa.Table}}`` before merging
        self.recovery = recovery  #: segments that were truncated or corrupted
        #: every problem load_run warned about (damaged segments, ignored or duplicated
        #: files, manifests that do not match their checksum or the rows on disk)
        self.problems = problems if problems is not None else []

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


def _warn(problems: list[str], message: str) -> None:
    problems.append(message)
    warnings.warn(message, RuntimeWarning, stacklevel=3)


def load_run(path: str | os.PathLike[str], *, merge: MergeFn | None = None) -> Run:
    """Load a run directory written by :class:`torchvitals.store.writer.RunWriter`.

    ``merge`` combines the per-rank tables of each table name (default
    :func:`torchvitals.store.merge.merge_ranks`). Raises ``FileNotFoundError`` (no directory / no
    manifest), :class:`ManifestError` (a ``ValueError`` naming the file: a manifest that
    is not a regular file, not JSON, or outside the limits of ``manifest_check.py``) or
    ``SchemaVersionError`` (a ``ValueError``: the run is newer than this reader).

    Every record batch is validated (``validate(full=True)`` and its checksum) before it
    is used; a damaged one is skipped. Damaged or truncated segments are recorded in
    ``Run.recovery`` (file, byte offset, rows lost) and warned about; so are files that
    look like copies (``scalars.rank0.0.arrows``), duplicated segments (refused), and
    tables whose rows differ from the closing manifest's ``rows_written``
    (``Run.problems`` lists every warning).
    """
    root = Path(path)
    if not root.exists():
        raise FileNotFoundError(f"torchvitals run directory not found: {root}")
    if not root.is_dir():
        raise NotADirectoryError(f"not a torchvitals run directory (not a directory): {root}")
    problems: list[str] = []
    manifests, entries = run_files(root, problems)
    recovery: list[SegmentRecovery] = []
    parts: dict[str, dict[int, list[pa.Table]]] = {t: {} for t in SCHEMAS}
    seen_content: dict[tuple, Path] = {}
    segment_rows: list[tuple[str, int, int, int]] = []  # table, rank, seg, rows read
    for (table, rank, seg, _files), (file, data, rec, fingerprint) in zip(
        entries, _read_segments(entries), strict=True
    ):
        if fingerprint and fingerprint in seen_content:
            _warn(
                problems,
                f"torchvitals: refused {file}: a copy of {seen_content[fingerprint]} (the "
                "same record batches); its rows are read once",
            )
            continue
        if fingerprint:
            seen_content[fingerprint] = file
        if rec is not None:
            recovery.append(rec)
            warn_damaged(problems, rec)
        parts[table].setdefault(rank, []).append(data)
        segment_rows.append((table, rank, seg, data.num_rows))

    per_rank = {
        t: {r: pa.concat_tables(ts) if len(ts) > 1 else ts[0] for r, ts in ranks.items()}
        for t, ranks in parts.items()
    }
    _check_counts(root, manifests, segment_rows, problems)
    merge_fn = merge or merge_ranks
    tables = {t: merge_fn(t, per_rank[t], manifests) for t in SCHEMAS}
    return Run(root, manifests, tables, per_rank, recovery, problems)


def warn_damaged(problems: list[str], rec: SegmentRecovery) -> None:
    """Warn about (and list in ``problems``) a segment not read whole."""
    units = "row group(s)" if rec.file.endswith("." + PARQUET) else "record batch(es)"
    _warn(
        problems,
        f"torchvitals: segment {rec.file} is truncated or corrupted ({rec.error}); "
        f"recovered {rec.batches} complete {units}, {rec.rows} row(s); {rec.describe()}",
    )


def run_files(
    root: Path, problems: list[str]
) -> tuple[dict[int, dict], list[tuple[str, int, int, dict[str, Path]]]]:
    """The checked manifests of the run directory ``root`` and its segments to read,
    ``(table, rank, seg, {format: path})`` in ``(table, rank, seg)`` order; files that
    look like copies, and links to a segment already listed, are warned about and left
    out. ``FileNotFoundError`` when there is no manifest."""
    manifests: dict[int, dict] = {}
    found: dict[tuple[str, int, int], dict[str, Path]] = {}
    for name in sorted(os.listdir(root)):
        entry = root / name
        rank = parse_manifest_name(name)
        if rank is not None:
            manifest, messages = _read_manifest(entry, rank)
            manifests[rank] = manifest
            for message in messages:
                _warn(problems, message)
            continue
        parsed = parse_segment_file(name)
        if parsed is not None and parsed[0] in SCHEMAS:
            found.setdefault(parsed[:3], {})[parsed[3]] = entry
        elif looks_like_run_file(name):
            _warn(
                problems,
                f"torchvitals: ignored {entry}: not an exact torchvitals file name (a copy or "
                "a renamed file?); files are named manifest.rank{R}.json and "
                "{table}.rank{R}.{seg:06d}.arrows (or .parquet)",
            )
    if not manifests:
        raise FileNotFoundError(f"not a torchvitals run directory (no manifest.rank*.json): {root}")
    seen_files: dict[tuple[int, int], Path] = {}
    entries = []
    for (table, rank, seg), files in sorted(found.items()):
        for fmt, file in sorted(files.items(), key=lambda f: f[0] != PARQUET):
            try:
                st = os.stat(file)
                identity = (st.st_dev, st.st_ino) if stat.S_ISREG(st.st_mode) else None
            except OSError:
                identity = None
            if identity is not None and identity in seen_files:
                _warn(
                    problems,
                    f"torchvitals: refused {file}: it is the same file as "
                    f"{seen_files[identity]} (a link); its rows are read once",
                )
                del files[fmt]
                continue
            if identity is not None:
                seen_files[identity] = file
        if files:
            entries.append((table, rank, seg, files))
    return manifests, entries


def _check_counts(
    root: Path,
    manifests: Mapping[int, dict],
    segment_rows: list[tuple[str, int, int, int]],
    problems: list[str],
) -> None:
    """A closed manifest says how many rows its writer's segments (those from
    ``first_segment`` on; earlier ones are a restarted job's) hold on disk: say so when
    the rows read differ (lost to damage, or files added)."""
    for rank, manifest in sorted(manifests.items()):
        written = manifest.get("rows_written")
        first = manifest.get("first_segment")
        if "closed_at" not in manifest or not isinstance(written, dict) or first is None:
            continue  # written before the count could be checked
        for table in SCHEMAS:
            expected = written.get(table, 0)
            start = first.get(table, float("inf"))
            got = sum(
                n for t, r, seg, n in segment_rows if t == table and r == rank and seg >= start
            )
            if got < expected:
                _warn(
                    problems,
                    f"torchvitals: {table} of rank {rank} in {root}: {expected - got} of the "
                    f"{expected} row(s) the manifest says were written are missing",
                )
            elif got > expected:
                _warn(
                    problems,
                    f"torchvitals: {table} of rank {rank} in {root}: {got} row(s) read, more "
                    f"than the {expected} the manifest says were written (files added?)",
                )
