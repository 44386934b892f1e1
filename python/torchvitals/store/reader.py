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

from .integrity import Damage, read_stream, with_checksum_flag
from .layout import (
    NotRegularFileError,
    looks_like_run_file,
    parse_manifest_name,
    parse_segment_name,
    read_regular_file,
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
    "SchemaVersionError",
    "SegmentRecovery",
    "concat_ranks",
    "load_run",
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
    batches: int  #: intact record batches recovered (and included in the run)
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


def _types_match(table: str, schema: pa.Schema) -> str | None:
    """Why an unverified segment's schema cannot be trusted, or None."""
    expected = SCHEMAS[table]
    for f in schema:
        i = expected.get_field_index(f.name)
        if i >= 0 and not f.type.equals(expected.field(i).type):
            return f"column {f.name!r} has type {f.type}, expected {expected.field(i).type}"
    return None


def _read_segments(segments: list[tuple[str, int, int, Path]]) -> Iterator[tuple]:
    """``_read_segment`` of each segment, in order. Segments are read on threads (pyarrow's
    validation and the checksum release the GIL), at most two ahead of the caller so that
    only a few segments are in memory at once."""
    workers = min(len(segments), os.cpu_count() or 1, 4)
    if workers <= 1:
        yield from (_read_segment(file, table, rank) for table, rank, _seg, file in segments)
        return
    with ThreadPoolExecutor(workers, thread_name_prefix="torchvitals-reader") as pool:
        ahead: deque[Future] = deque()
        for table, rank, _seg, file in segments:
            ahead.append(pool.submit(_read_segment, file, table, rank))
            if len(ahead) > workers + 1:
                yield ahead.popleft().result()
        while ahead:
            yield ahead.popleft().result()


def _read_segment(
    path: Path, table: str, rank: int
) -> tuple[pa.Table, SegmentRecovery | None, tuple]:
    """Every intact record batch of one stream segment, conformed to the current schema;
    the damage, if any; and the segment's fingerprint (to refuse duplicated segments)."""
    try:
        data = read_regular_file(path, MAX_SEGMENT_BYTES)
    except (OSError, ValueError) as exc:
        why = (
            exc.strerror if isinstance(exc, NotRegularFileError) else f"{type(exc).__name__}: {exc}"
        )
        damage = (Damage(0, None, f"not read: {why}"),)
        return empty_table(table), SegmentRecovery(str(path), table, rank, 0, 0, why, damage), ()
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
            why = _types_match(table, schema)
        if why is not None and batches:
            damage += [Damage(0, b.num_rows, why) for b in batches]
            batches = []
    table_data = empty_table(table)
    if batches:
        try:
            table_data = conform(table, pa.Table.from_batches(batches, schema=schema))
            for name in (*REQUIRED[table], "rank"):
                if table_data.column(name).null_count:
                    raise ValueError(f"required column {name!r} holds nulls")
        except (ValueError, pa.ArrowException) as exc:
            damage += [Damage(0, b.num_rows, f"{type(exc).__name__}: {exc}") for b in batches]
            batches = []
            table_data = empty_table(table)
    fingerprint = (table, rank, len(data), tuple(contents.checksums)) if batches else ()
    if not damage:
        return table_data, None, fingerprint
    rec = SegmentRecovery(
        str(path),
        table,
        rank,
        len(batches),
        table_data.num_rows if batches else 0,
        damage[0].error,
        tuple(damage),
    )
    return table_data, rec, fingerprint


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
    manifests: dict[int, dict] = {}
    segments: list[tuple[str, int, int, Path]] = []
    for name in sorted(os.listdir(root)):
        entry = root / name
        rank = parse_manifest_name(name)
        if rank is not None:
            manifest, found = _read_manifest(entry, rank)
            manifests[rank] = manifest
            for message in found:
                _warn(problems, message)
            continue
        parsed = parse_segment_name(name)
        if parsed is not None and parsed[0] in SCHEMAS:
            segments.append((*parsed, entry))
        elif looks_like_run_file(name):
            _warn(
                problems,
                f"torchvitals: ignored {entry}: not an exact torchvitals file name (a copy or "
                "a renamed file?); files are named manifest.rank{R}.json and "
                "{table}.rank{R}.{seg:06d}.arrows",
            )
    if not manifests:
        raise FileNotFoundError(f"not a torchvitals run directory (no manifest.rank*.json): {root}")

    recovery: list[SegmentRecovery] = []
    parts: dict[str, dict[int, list[pa.Table]]] = {t: {} for t in SCHEMAS}
    seen_files: dict[tuple[int, int], Path] = {}
    seen_content: dict[tuple, Path] = {}
    segment_rows: list[tuple[str, int, int, int]] = []  # table, rank, seg, rows read
    to_read = []
    for table, rank, seg, file in sorted(segments, key=lambda s: (s[0], s[1], s[2])):
        try:
            st = os.stat(file)
            identity = (st.st_dev, st.st_ino) if stat.S_ISREG(st.st_mode) else None
        except OSError:
            identity = None
        if identity is not None and identity in seen_files:
            _warn(
                problems,
                f"torchvitals: refused {file}: it is the same file as {seen_files[identity]} "
                "(a link); its rows are read once",
            )
            continue
        if identity is not None:
            seen_files[identity] = file
        to_read.append((table, rank, seg, file))
    for (table, rank, seg, file), (data, rec, fingerprint) in zip(
        to_read, _read_segments(to_read), strict=True
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
            _warn(
                problems,
                f"torchvitals: segment {file} is truncated or corrupted ({rec.error}); "
                f"recovered {rec.batches} complete record batch(es), {rec.rows} row(s); "
                f"{rec.describe()}",
            )
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
