"""The open Arrow IPC stream segment of each table, for one rank of a run directory.

A table's rows are appended to ``{table}.rank{R}.{seg:06d}.arrows``; once that file
is larger than ``segment_bytes`` it is closed and the next write opens ``seg + 1``.
Only the writer thread uses a :class:`SegmentFiles`.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable

import pyarrow as pa

from .layout import SEGMENT_RE, segment_name
from .schema import SCHEMAS

__all__ = ["SegmentFiles"]

#: ``on_error(exc, path)``: what to do when closing or flushing the segment at ``path`` failed.
OnError = Callable[[BaseException, str], None]


class _Segment:
    """One stream file: the file object and the Arrow stream writer on top of it."""

    __slots__ = ("file", "path", "writer")

    def __init__(self, path: str, schema: pa.Schema):
        self.path = path
        self.file = open(path, "wb")  # noqa: SIM115 - closed in close()
        try:
            self.writer = pa.ipc.new_stream(self.file, schema)
        except BaseException:
            self.file.close()
            raise

    def close(self) -> None:
        try:
            self.writer.close()  # end-of-stream marker
            self.file.flush()
        finally:
            self.file.close()


class SegmentFiles:
    """Appends record batches to the segments of one rank, one open segment per table."""

    def __init__(self, path: str, rank: int, segment_bytes: int):
        self.path = path
        self.rank = rank
        self.segment_bytes = segment_bytes
        self.rows_written: dict[str, int] = {t: 0 for t in SCHEMAS}
        self._open: dict[str, _Segment] = {}
        self._next: dict[str, int] = {}  # number of the next segment to open, per table

    def number_after_existing(self) -> None:
        """Number new segments after those a previous process left in ``path``: never overwrite."""
        for name in os.listdir(self.path):
            m = SEGMENT_RE.match(name)
            if m and int(m["rank"]) == self.rank and m["table"] in SCHEMAS:
                t = m["table"]
                self._next[t] = max(self._next.get(t, 0), int(m["seg"]) + 1)

    def path_for(self, table: str) -> str:
        """The file a write to ``table`` goes to: its open segment, else the next one to open."""
        seg = self._open.get(table)
        if seg is not None:
            return seg.path
        return os.path.join(self.path, segment_name(table, self.rank, self._next.get(table, 0)))

    def write(self, table: str, batch: pa.RecordBatch) -> None:
        """Append ``batch`` to the open segment of ``table``, opening the next one if needed."""
        seg = self._open.get(table)
        if seg is None:
            seg = _Segment(self.path_for(table), SCHEMAS[table])
            self._next[table] = self._next.get(table, 0) + 1
            self._open[table] = seg
        seg.writer.write_batch(batch)
        self.rows_written[table] += batch.num_rows

    def flush(self, tables: list[str], on_error: OnError) -> None:
        """Hand what was written to ``tables`` to the OS; close each segment now over size."""
        for table in tables:
            seg = self._open.get(table)
            if seg is None:  # abandoned after an error
                continue
            try:
                seg.file.flush()
                if seg.file.tell() >= self.segment_bytes:
                    del self._open[table]  # the next write opens the next segment
                    seg.close()
            except (OSError, pa.ArrowException) as exc:
                on_error(exc, seg.path)

    def close_all(self, on_error: OnError) -> None:
        """Close every open segment, writing its end-of-stream marker."""
        while self._open:  # on_error may abandon() the rest
            seg = self._open.pop(next(iter(self._open)))
            try:
                seg.close()
            except (OSError, pa.ArrowException) as exc:
                on_error(exc, seg.path)

    def abandon(self) -> None:
        """Close every file without writing more (after an I/O error: writing is over)."""
        for seg in self._open.values():
            with contextlib.suppress(Exception):
                seg.file.close()
        self._open.clear()
