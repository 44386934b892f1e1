"""Closed segments become Parquet files that any engine scans lazily, and their verified reading.

A segment is written as an Arrow IPC *stream* (appended batch by batch: whatever was
flushed survives a crash). Streams have no footer, so no engine can scan them lazily;
once a segment is closed (rotated, or at ``close()``), :func:`compact` converts it, on
the writer's compaction thread, into ``{table}.rank{R}.{seg:06d}.parquet``:

- every batch of the stream is verified (``validate(full=True)`` and its checksum) while
  it is converted, one batch at a time (the stream is memory-mapped): a damaged stream is
  not converted and stays as it is;
- zstd, byte stream split histograms and float statistics (:data:`PARQUET_OPTIONS`), row
  groups of about :data:`ROW_GROUP_BYTES` of data, each sorted by step (a stable sort: the
  rows of one step keep their order), statistics on, so ``step``/``layer`` filters
  skip row groups; the footer's key-value metadata holds the table, the schema version,
  the row count and the stream batches' checksums (:data:`ROWS_KEY`, :data:`SOURCE_KEY`),
  which the reader checks against the file, and the checksums of the file's own bytes
  (:mod:`.parquet_seal`: the footer's and each row group's), which the reader checks
  before it decodes anything; every page also carries the CRC-32 of the Parquet format
  (``write_page_checksum``) for other readers;
- written to an exclusive temporary file in the run directory, ``fsync``ed, linked to its
  name (never over an existing file or link), then the stream is removed. A failure at
  any point (a full disk, a crash) leaves the stream segment intact; a crash between the
  link and the removal leaves both, and the reader reads the Parquet file (complete,
  since it was synced before it got its name) and never both.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import secrets
from collections.abc import Iterator

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .integrity import Damage, verified_batches, with_checksum_flag
from .layout import PARQUET, create_new, parse_segment_file, segment_name
from .manifest_check import SchemaVersionError, newer_message
from .parquet_seal import FOOTER_KEY, FileSeal, placeholders, seal
from .schema import REQUIRED, SCHEMA_VERSION, SCHEMAS, conform

__all__ = [
    "PARQUET_OPTIONS",
    "ROWS_KEY",
    "ROW_GROUP_BYTES",
    "SOURCE_KEY",
    "ParquetSegment",
    "compact",
    "open_parquet",
    "parquet_row_groups",
    "read_row_group",
    "source_checksums",
    "types_mismatch",
]

#: Uncompressed bytes of Arrow data per row group: large enough for good compression and
#: few footer entries, small enough that a scan holds only a few in memory.
ROW_GROUP_BYTES = 32 << 20
#: How every compacted segment is written (pyarrow.parquet.ParquetWriter keywords).
PARQUET_OPTIONS: dict = {
    "compression": "zstd",
    # (9 would save 1.7 more bytes per tensor and step for twice the CPU; 19: 3.9 more.)
    "compression_level": 3,
    # Labels as dictionaries.
    "use_dictionary": ["layer", "kind", "name", "rank", "attempt", "shards_complete"],
    # Histogram bins and the float statistics split into byte streams (BYTE_STREAM_SPLIT:
    # the k-th byte of every value together; the values are unchanged, only laid out
    # differently), which zstd then packs far better: small counts leave their high bytes
    # zero. A GPT-2-small run (60 steps), bytes per tensor and step: hist 79.1 -> 57.1
    # (111.6 with DELTA_BINARY_PACKED, whose bit-packed deltas zstd cannot shrink),
    # layers 19.1 -> 18.1. Each tensor's rows together would save 2.6 and 1.4 more, but
    # putting a row group back in step order costs the reader a quarter of its CPU. A
    # list's values are named by their leaf path ("counts.list.element"; a plain
    # "counts", or any name that is no leaf, pyarrow ignores without a word). pyarrow,
    # polars, DuckDB and Spark 4 decode it (Parquet format 2.11 for integers).
    "column_encoding": {
        name: "BYTE_STREAM_SPLIT"
        for name in (
            "counts.list.element",
            "neg_counts.list.element",
            "sum",
            "sumsq",
            "max_abs",
        )
    },
    "write_statistics": True,
    "write_page_checksum": True,
    "data_page_size": 1 << 20,
}
#: Footer key: rows in the file (checked against the row groups read).
ROWS_KEY = b"torchvitals.rows"
#: Footer key: the checksums of the stream batches the file was made from (24 hex
#: digits each, space-separated): what tells a copied segment from another one.
SOURCE_KEY = b"torchvitals.source_checksums"
_TABLE_KEY = b"torchvitals.table"
_VERSION_KEY = b"torchvitals.schema_version"


def _sorted_by_step(parts: list[pa.Table]) -> pa.Table:
    t = pa.concat_tables(parts)
    order = pc.sort_indices(t, sort_keys=[("step", "ascending")])  # stable
    return t.take(order)


def _sync_dir(dir_fd: int) -> None:
    with contextlib.suppress(OSError):  # some file systems refuse fsync on a directory
        os.fsync(dir_fd)


def compact(
    dir_fd: int, name: str, identity: tuple[int, int], row_group_bytes: int | None = None
) -> tuple[str, tuple[int, int]]:
    """Convert the closed stream segment ``name`` (in the directory ``dir_fd``, the file
    with ``(st_dev, st_ino)`` ``identity``) into its Parquet file, and remove the stream.

    Returns the Parquet file's name and identity. Raises (``OSError``, ``ValueError``,
    ``pa.ArrowException``) with the stream left intact when anything fails."""
    parsed = parse_segment_file(name)
    if parsed is None or parsed[3] != "arrows" or parsed[0] not in SCHEMAS:
        raise ValueError(f"{name}: not a stream segment of a known table")
    table, rank, seg, _fmt = parsed
    row_group_bytes = ROW_GROUP_BYTES if row_group_bytes is None else row_group_bytes
    target = segment_name(table, rank, seg, PARQUET)
    fd = os.open(name, os.O_RDONLY | os.O_CLOEXEC | getattr(os, "O_NOFOLLOW", 0), dir_fd=dir_fd)
    tmp = f".{target}.{secrets.token_hex(6)}.tmp"
    try:
        st = os.fstat(fd)
        if (st.st_dev, st.st_ino) != identity:
            raise ValueError(f"{name}: not the segment this writer closed")
        if st.st_size == 0:
            raise ValueError(f"{name}: empty")
        out_fd = create_new(tmp, dir_fd=dir_fd)
        # Not closed explicitly: decoded batches may still point into it; it is unmapped
        # when the last of them goes.
        data = mmap.mmap(fd, 0, access=mmap.ACCESS_READ)
        with os.fdopen(out_fd, "wb") as sink:
            schema = with_checksum_flag(SCHEMAS[table])
            out = pa.BufferOutputStream()  # sealed in memory, then written
            writer = pq.ParquetWriter(out, schema, **PARQUET_OPTIONS)
            rows = 0
            sums: list[bytes] = []
            groups = 0
            parts: list[pa.Table] = []
            size = 0
            try:
                for batch, checksum in verified_batches(data):
                    sums.append(b"%024x" % checksum)
                    if not batch.num_rows:  # (Parquet has no empty row group)
                        continue
                    part = conform(table, batch)
                    parts.append(part)
                    size += part.nbytes
                    rows += part.num_rows
                    if size >= row_group_bytes:
                        group = _sorted_by_step(parts)
                        writer.write_table(group, row_group_size=group.num_rows)
                        groups += 1
                        parts, size = [], 0
                if parts:
                    group = _sorted_by_step(parts)
                    writer.write_table(group, row_group_size=group.num_rows)
                    groups += 1
                writer.add_key_value_metadata(
                    {
                        ROWS_KEY: str(rows).encode(),
                        SOURCE_KEY: b" ".join(sums),
                        **placeholders(groups),
                    }
                )
            finally:
                writer.close()
            written = bytearray(out.getvalue())
            seal(written)
            sink.write(written)
            sink.flush()
            os.fsync(sink.fileno())
        # A link, unlike a rename, never replaces what is at the name (a file, a link).
        os.link(tmp, target, src_dir_fd=dir_fd, dst_dir_fd=dir_fd, follow_symlinks=False)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp, dir_fd=dir_fd)
        raise
    finally:
        os.close(fd)
    done = os.stat(tmp, dir_fd=dir_fd, follow_symlinks=False)
    # From here on the Parquet file is complete: a failure to tidy up leaves the stream
    # beside it, which the reader ignores.
    with contextlib.suppress(OSError):
        os.unlink(tmp, dir_fd=dir_fd)
        _sync_dir(dir_fd)
        now = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        if (now.st_dev, now.st_ino) == identity:  # still the file this writer wrote
            os.unlink(name, dir_fd=dir_fd)
            _sync_dir(dir_fd)
    return target, (done.st_dev, done.st_ino)


def source_checksums(metadata: dict | None) -> tuple[int, ...]:
    """The stream batches' checksums a Parquet file's footer lists (empty when absent)."""
    text = (metadata or {}).get(SOURCE_KEY, b"")
    try:
        return tuple(int(x, 16) for x in text.split())
    except ValueError:
        return ()


def types_mismatch(table: str, schema: pa.Schema) -> str | None:
    """Why columns of ``schema`` cannot be ``table``'s (another type), or None."""
    expected = SCHEMAS[table]
    for f in schema:
        i = expected.get_field_index(f.name)
        if i >= 0 and not f.type.equals(expected.field(i).type):
            return f"column {f.name!r} has type {f.type}, expected {expected.field(i).type}"
    return None


def _describe(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:300]


def parquet_row_groups(
    source, table: str, path: str, columns: list[str] | None = None
) -> Iterator[tuple[pa.Table | None, Damage | None]]:
    """Each row group of the Parquet segment ``source`` (a file object or a buffer) as
    ``(rows, None)``, verified, conformed to the current schema of ``table`` (or to
    ``columns`` of it), or ``(None, Damage)`` when it is damaged; one ``(None, Damage)``
    for a file whose footer cannot be read or trusted.

    Verified: the footer's and each row group's checksum (:mod:`.parquet_seal`),
    ``validate(full=True)``, the column types, the required columns non-null, and the
    row count against the footer's (:data:`ROWS_KEY`). ``SchemaVersionError`` (naming
    ``path``) for a newer version."""
    try:
        pf = open_parquet(source, table, path)
        groups = range(pf.metadata.num_row_groups)
    except SchemaVersionError:
        raise
    except (pa.ArrowException, OSError, ValueError, EOFError) as exc:
        yield None, Damage(0, None, f"no readable Parquet footer: {_describe(exc)}")
        return
    for i in range(len(groups)):
        yield read_row_group(pf, i, table, columns)


class ParquetSegment:
    """An opened Parquet segment whose footer was checked (:func:`open_parquet`)."""

    def __init__(self, file: pq.ParquetFile, sealed: FileSeal) -> None:
        self.file = file
        self.sealed = sealed

    @property
    def metadata(self) -> pq.FileMetaData:
        return self.file.metadata

    @property
    def schema_arrow(self) -> pa.Schema:
        return self.file.schema_arrow


def open_parquet(source, table: str, path: str) -> ParquetSegment:
    """The Parquet segment ``source``, its footer checked against its checksum and
    ``table`` (ValueError or an Arrow error when it cannot be trusted;
    ``SchemaVersionError`` when newer)."""
    if isinstance(source, (bytes, bytearray, memoryview, pa.Buffer)):
        source = pa.BufferReader(source)
    pf = pq.ParquetFile(source)
    meta = pf.metadata.metadata or {}
    version = meta.get(_VERSION_KEY, b"")
    newer = version.isdigit() and int(version) > SCHEMA_VERSION
    try:
        sealed = FileSeal(source, pf.metadata)  # before anything in the footer is trusted
    except ValueError:
        if newer and FOOTER_KEY not in meta:  # sealed otherwise, by a later version
            raise SchemaVersionError(newer_message(path, int(version))) from None
        raise
    if newer:
        raise SchemaVersionError(newer_message(path, int(version)))
    named = meta.get(_TABLE_KEY)
    if named != table.encode():
        shown = "none" if named is None else repr(named.decode("utf-8", "replace"))
        raise ValueError(f"the file names table {shown}, not {table!r}")
    rows = meta.get(ROWS_KEY, b"")
    if not rows.isdigit() or int(rows) != pf.metadata.num_rows:
        raise ValueError(
            f"the footer holds {pf.metadata.num_rows} row(s), its {ROWS_KEY.decode()} "
            f"says {rows.decode('ascii', 'replace')!r}"
        )
    why = types_mismatch(table, pf.schema_arrow)
    if why is not None:
        raise ValueError(why)
    return ParquetSegment(pf, sealed)


def read_row_group(
    segment: ParquetSegment, i: int, table: str, columns: list[str] | None = None
) -> tuple[pa.Table | None, Damage | None]:
    """Row group ``i`` of an opened segment, verified (see :func:`parquet_row_groups`)."""
    group = segment.metadata.row_group(i)
    offset = group.column(0).file_offset if group.num_columns else 0
    try:
        segment.sealed.check_group(i)  # before anything is decoded
        rows_read = segment.file.read_row_group(i, columns=columns)
        if rows_read.num_rows != group.num_rows:
            raise ValueError(f"{rows_read.num_rows} row(s) read, the footer says {group.num_rows}")
        rows_read.validate(full=True)
        if columns is None:
            rows_read = conform(table, rows_read)
        for name in (*REQUIRED[table], "rank"):
            if name in rows_read.column_names and rows_read.column(name).null_count:
                raise ValueError(f"required column {name!r} holds nulls")
    except (pa.ArrowException, OSError, ValueError, EOFError) as exc:
        return None, Damage(offset, group.num_rows, f"row group {i} skipped: {_describe(exc)}")
    return rows_read, None
