"""``torchvitals report --watch RUN``: the HTML report re-rendered (and one status line
printed) as a run grows, until its manifests say it closed or Ctrl-C.

Only what is new is read. :class:`RunWatcher` keeps, per segment file, what it has read:
for a stream segment, the byte offset reached, the schema and dictionary messages in
effect, and the rows of the record batches so far; a refresh reads the bytes after that
offset, decodes the complete messages among them (every batch verified, as
:func:`~torchvitals.store.integrity.read_stream` does for ``load_run``) and keeps an
incomplete message at the end for the next refresh. A segment compacted into Parquet
(:mod:`torchvitals.store.compaction`) while watched is not read again when its footer
says it holds the rows already read; otherwise it is read whole
(:func:`~torchvitals.store.reader.read_segment_file`). Manifests (small) are read at every
refresh. ``RunWatcher.bytes_read`` counts the segment bytes read.

The run is then assembled as ``load_run`` does (segments in order, ranks merged with
:func:`~torchvitals.store.merge.merge_ranks`), so the last report is the one
``torchvitals report`` writes of the closed run. A segment that stays damaged (not only cut
short by a writer still at work) is read, around its damage, once the run is closed.
"""

from __future__ import annotations

import os
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from rich.console import Console

from torchvitals.store.integrity import Damage, _dictionary_key, read_stream, with_checksum_flag
from torchvitals.store.layout import PARQUET, STREAM
from torchvitals.store.manifest_check import SchemaVersionError, newer_message
from torchvitals.store.merge import merge_ranks
from torchvitals.store.reader import (
    Run,
    SegmentRecovery,
    _assemble,
    read_segment_file,
    run_files,
)
from torchvitals.store.schema import SCHEMA_VERSION, SCHEMAS, empty_table

__all__ = ["Refresh", "RunWatcher", "watch"]

_EOS = b"\xff\xff\xff\xff\x00\x00\x00\x00"


@dataclass
class _Segment:
    """What has been read of one segment number: rows so far and where reading stopped."""

    path: Path
    table: str
    rank: int
    offset: int = 0  #: bytes of the stream read so far
    tail: bytes = b""  #: an incomplete message at the end of what was read
    head: bytes = b""  #: the stream's schema message
    dictionaries: dict[int, list[bytes]] = field(default_factory=dict)
    parts: list[pa.Table] = field(default_factory=list)
    rows: int = 0
    damage: list[Damage] = field(default_factory=list)
    ended: bool = False  #: the end-of-stream marker was read
    whole: bool = False  #: read whole (a Parquet file): never read again

    def table_data(self) -> pa.Table:
        if not self.parts:
            return empty_table(self.table)
        return pa.concat_tables(self.parts) if len(self.parts) > 1 else self.parts[0]

    def recovery(self) -> SegmentRecovery | None:
        if not self.damage:
            return None
        d = sorted(self.damage, key=lambda d: d.offset)
        return SegmentRecovery(
            str(self.path), self.table, self.rank, len(self.parts), self.rows, d[0].error, tuple(d)
        )


def _read_from(path: Path, offset: int) -> bytes:
    """The bytes of the regular file ``path`` from ``offset`` on (never through a link)."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | getattr(os, "O_NONBLOCK", 0))
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(f"not a regular file: {path}")
        os.lseek(fd, offset, os.SEEK_SET)
        chunks = []
        while chunk := os.read(fd, 1 << 20):
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def _complete_messages(seg: _Segment, buf: bytes) -> int:
    """How many bytes at the start of ``buf`` are complete messages (the end-of-stream
    marker included); records the schema message and the dictionaries as they pass."""
    reader = pa.BufferReader(buf)
    pos = 0
    while pos < len(buf):
        if buf[pos : pos + 8] == _EOS:
            seg.ended = True
            return len(buf)  # anything after the marker is the walk's to report
        reader.seek(pos)
        try:
            message = pa.ipc.read_message(reader)
        except (pa.ArrowException, OSError, EOFError, ValueError):
            return pos
        end = reader.tell()
        if message.type == "schema" and not seg.head:
            seg.head = buf[pos:end]
        elif message.type == "dictionary":
            try:
                dict_id, delta = _dictionary_key(bytes(message.metadata))
            except ValueError:
                return pos
            kept = seg.dictionaries.setdefault(dict_id, [])
            if not delta:
                kept.clear()
            kept.append(buf[pos:end])
        pos = end
    return pos


def _decode(seg: _Segment, chunk: bytes, prefix: bytes, base: int) -> None:
    """The record batches of ``chunk`` (complete messages from file offset ``base``), read
    after ``prefix`` (the schema and the dictionaries in effect where the chunk starts)."""
    contents = read_stream(prefix + chunk, with_checksum_flag(SCHEMAS[seg.table]))
    shift = base - len(prefix)
    damage = [Damage(max(d.offset + shift, 0), d.rows, d.error) for d in contents.damage]
    schema = contents.schema
    if schema is not None:
        meta = schema.metadata or {}
        v = meta.get(b"torchvitals.schema_version")
        if v is not None and v.isdigit() and int(v) > SCHEMA_VERSION:
            raise SchemaVersionError(newer_message(seg.path, int(v)))
    data, rec = _assemble(seg.path, seg.table, seg.rank, schema, contents.batches, damage)
    if data.num_rows:
        seg.parts.append(data)
        seg.rows += data.num_rows
    if rec is not None:
        seg.damage += list(rec.damage)


def _update_stream(seg: _Segment, final: bool) -> int:
    """Reads what the stream segment gained; returns the bytes read. ``final``: the writer
    is done, so an incomplete or unreadable tail is damage, read around and reported."""
    try:
        size = os.stat(seg.path, follow_symlinks=False).st_size
    except FileNotFoundError:
        return 0  # compacted since it was listed: the Parquet file is read next time
    if size < seg.offset:  # replaced by a shorter file: start again
        seg.__init__(seg.path, seg.table, seg.rank)
    new = _read_from(seg.path, seg.offset) if size > seg.offset else b""
    seg.offset += len(new)
    buf = seg.tail + new
    if not buf:
        return 0
    prefix = (
        b""
        if not seg.head
        else seg.head
        + b"".join(m for dict_id in sorted(seg.dictionaries) for m in seg.dictionaries[dict_id])
    )
    base = seg.offset - len(buf)
    done = _complete_messages(seg, buf)
    if final and done < len(buf):
        done = len(buf)
    chunk, seg.tail = buf[:done], buf[done:]
    if chunk:
        _decode(seg, chunk, prefix if base else b"", base)
    return len(new)


def _parquet_rows(path: Path) -> tuple[int, int]:
    """(rows, footer bytes) from a Parquet file's footer alone."""
    meta = pq.read_metadata(path)
    return meta.num_rows, meta.serialized_size + 8


@dataclass
class Refresh:
    """What one :meth:`RunWatcher.refresh` found."""

    run: Run
    bytes_read: int  #: segment bytes read by this refresh
    closed: bool


class RunWatcher:
    """A run directory read incrementally (see the module docstring)."""

    def __init__(self, path: str | os.PathLike[str]):
        self.root = Path(path)
        self.segments: dict[tuple[str, int, int], _Segment] = {}
        self.bytes_read = 0  #: segment bytes read since the start

    def _segment(self, key: tuple[str, int, int], files: dict[str, Path], final: bool) -> int:
        table, rank, _seg = key
        seg = self.segments.get(key)
        if PARQUET in files:
            path = files[PARQUET]
            if seg is not None and seg.whole:
                return 0
            if seg is not None:  # compacted since it was read as a stream
                rows, footer = _parquet_rows(path)
                if rows == seg.rows and not seg.damage:
                    seg.whole = True
                    return footer
            data, rec = read_segment_file(path)
            seg = _Segment(path, table, rank, whole=True, parts=[data], rows=data.num_rows)
            seg.damage = list(rec.damage) if rec is not None else []
            self.segments[key] = seg
            return os.stat(path).st_size
        if seg is None:
            seg = self.segments[key] = _Segment(files[STREAM], table, rank)
        return _update_stream(seg, final)

    def refresh(self, final: bool = False) -> Refresh:
        """Reads what is new and returns the run as it is now. ``final``: the run is closed,
        so incomplete tails are read as damage."""
        if not self.root.exists():
            raise FileNotFoundError(f"torchvitals run directory not found: {self.root}")
        if not self.root.is_dir():
            raise NotADirectoryError(
                f"not a torchvitals run directory (not a directory): {self.root}"
            )
        problems: list[str] = []
        manifests, entries = run_files(self.root, problems)
        closed = all("closed_at" in m for m in manifests.values())
        before = self.bytes_read
        listed = set()
        for table, rank, seg, files in entries:
            key = (table, rank, seg)
            listed.add(key)
            self.bytes_read += self._segment(key, files, final or closed)
        for key in set(self.segments) - listed:
            del self.segments[key]  # removed from the directory
        parts: dict[str, dict[int, list[pa.Table]]] = {t: {} for t in SCHEMAS}
        recovery = []
        for (table, rank, _seg), seg in sorted(self.segments.items()):
            parts[table].setdefault(rank, []).append(seg.table_data())
            rec = seg.recovery()
            if rec is not None:
                recovery.append(rec)
                problems.append(f"segment {rec.file}: {rec.describe()}")
        per_rank = {
            t: {r: pa.concat_tables(ts) if len(ts) > 1 else ts[0] for r, ts in ranks.items()}
            for t, ranks in parts.items()
        }
        tables = {t: merge_ranks(t, per_rank[t], manifests) for t in SCHEMAS}
        run = Run(self.root, manifests, tables, per_rank, recovery, problems)
        return Refresh(run, self.bytes_read - before, closed)


def watch(
    args,
    *,
    on_refresh: Callable[[Refresh], None] | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> int:
    """``torchvitals report --watch``: re-renders ``args.out`` (default RUN/report.html)
    whenever the run gained rows, with one status line; at close, the full report and
    terminal summary as ``torchvitals report`` prints them. ``on_refresh`` is called after
    every refresh (tests)."""
    from torchvitals.cli import _analyse_and_report, _arrays, _detect, note
    from torchvitals.report.html import write_report

    console = Console()
    out = Path(args.out) if args.out else Path(args.run) / "report.html"
    watcher = RunWatcher(args.run)
    shown: set[str] = set()
    rendered = None
    console.print(
        f"watching {args.run} every {args.interval:g} s until it closes (Ctrl-C to stop); "
        f"report: {out}"
    )
    try:
        while True:
            refresh = watcher.refresh()
            run = refresh.run
            for problem in run.problems:
                if problem not in shown:
                    shown.add(problem)
                    note("report", problem.removeprefix("torchvitals: "))
            rows = tuple(t.num_rows for t in run.tables.values())
            if refresh.closed:
                if run.scalars.num_rows == 0:
                    _arrays(run, args.metric)  # says, in one line, that there is no data
                _analyse_and_report(run, args, console, out)
                if on_refresh is not None:
                    on_refresh(refresh)
                return 0
            if rows != rendered and run.scalars.num_rows:
                arrays = _arrays(run, args.metric)
                events = _detect(arrays, args)
                write_report(run, events, out, layers=args.layers, arrays=arrays)
                rendered = rows
                status = _status(arrays, events, refresh, args.metric)
                console.print(status, overflow="ellipsis", no_wrap=True, crop=True)
            elif not run.scalars.num_rows:
                console.print(f"{time.strftime('%H:%M:%S')} waiting for data in {args.run}")
            if on_refresh is not None:
                on_refresh(refresh)
            sleep(args.interval)
    except KeyboardInterrupt:
        console.print(f"stopped watching; last report: {out if rendered else 'none written'}")
        return 0


def _status(arrays, events, refresh: Refresh, metric: str) -> str:
    step, values = arrays[0], arrays[1]
    worst = sum(e.severity != "info" for e in events)
    kb = refresh.bytes_read / 1024
    return (
        f"{time.strftime('%H:%M:%S')} step {int(step[-1])} {metric} {values[-1]:.4g} | "
        f"{len(events)} event(s), {worst} warning+ | read {kb:.1f} KiB"
    )
