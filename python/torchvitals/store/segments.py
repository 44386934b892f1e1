"""The open Arrow IPC stream segment of each table, for one rank of a run directory.

A table's rows are appended to ``{table}.rank{R}.{seg:06d}.arrows``; once that file
is larger than ``segment_bytes`` it is closed and the next write opens ``seg + 1``.
Only the writer thread uses a :class:`SegmentFiles`.

Each record batch is produced by the Arrow stream writer into memory, sealed with its
checksum (:class:`torchvitals.store.integrity.Sealer`) and appended to the file with
plain ``write`` calls, so it is with the operating system as soon as ``write`` returns
(a SIGKILL loses nothing written). A write that fails (a full disk) is taken back: the
file is cut to its last complete batch and closed, and the next write opens the next
segment, so a segment never holds half a batch or a batch whose dictionaries are missing.
Files are created exclusively, never through a link (:mod:`torchvitals.store.rundir`).

A segment closed whole (rotated, or at :meth:`SegmentFiles.close_all`) is then compacted
into a Parquet file that any engine scans lazily (:mod:`torchvitals.store.compaction`),
on a thread of its own so that writing goes on meanwhile; the segment being written stays
a stream. A compaction that fails leaves the stream as it is (warned about once; no data
is lost, the reader reads either format).
"""

from __future__ import annotations

import contextlib
import os
import time
import warnings
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout

import pyarrow as pa

from .compaction import compact
from .integrity import Sealer, checksum_metadata, with_checksum_flag
from .layout import PARQUET, parse_segment_file, parse_segment_name, segment_name, write_all
from .rundir import RunDirectory
from .schema import SCHEMAS

__all__ = ["SegmentFiles"]

#: ``on_error(exc, path)``: what to do when closing or flushing the segment at ``path`` failed.
OnError = Callable[[BaseException, str], None]

_BATCH_METADATA = checksum_metadata()
_SCHEMAS = {t: with_checksum_flag(s) for t, s in SCHEMAS.items()}
#: Whether closed segments are compacted into Parquet files when the caller does not say
#: (``SegmentFiles(compact=None)``, as ``RunWriter`` constructs it).
COMPACT = True
#: Seconds ``close_all`` waits for the compactions still running (the writer's ``close``
#: waits 30 s for its thread); later ones finish in the background.
COMPACT_WAIT = 20.0
#: How many taken names (a file or link already there) a new segment skips before failing.
_NAME_ATTEMPTS = 16


def _compact_and_close(dir_fd: int, name: str, identity: tuple[int, int]):
    try:
        return compact(dir_fd, name, identity)
    finally:
        os.close(dir_fd)


class _Capture:
    """The byte sink of an Arrow stream writer: what it writes is collected in memory."""

    closed = False

    def __init__(self) -> None:
        self._data = bytearray()

    def write(self, data) -> int:
        self._data += data
        return len(data)

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass

    def take(self) -> bytearray:
        data, self._data = self._data, bytearray()
        return data


class _Segment:
    """One stream file: its descriptor, the Arrow stream writer, what is on disk."""

    __slots__ = ("_capture", "_sealer", "fd", "identity", "name", "path", "rows", "size", "writer")

    def __init__(
        self, directory: RunDirectory, name: str, schema: pa.Schema, options: pa.ipc.IpcWriteOptions
    ):
        self.name = name
        self.path = os.path.join(directory.path, name)
        self.fd = directory.create(name)
        st = os.fstat(self.fd)
        self.identity = (st.st_dev, st.st_ino)
        self.size = 0  # bytes on disk: whole messages only
        self.rows = 0
        self._capture = _Capture()
        self._sealer = Sealer()
        self.writer = pa.ipc.new_stream(self._capture, schema, options=options)

    def _append(self, data: bytes | bytearray) -> None:
        try:
            write_all(self.fd, data)
        except OSError:
            # Take back a partial write: the file ends with its last complete message.
            with contextlib.suppress(OSError):
                os.ftruncate(self.fd, self.size)
                os.lseek(self.fd, self.size, os.SEEK_SET)
            raise
        self.size += len(data)

    def append(self, batch: pa.RecordBatch) -> None:
        self.writer.write_batch(batch, custom_metadata=_BATCH_METADATA)
        self._append(self._sealer.seal(self._capture.take(), batch))
        self.rows += batch.num_rows

    def deleted(self) -> bool:
        """Whether the file was removed (unlinked) while open."""
        try:
            return os.fstat(self.fd).st_nlink == 0
        except OSError:
            return True

    def close(self) -> None:
        """Write the end-of-stream marker and close the file."""
        try:
            self.writer.close()
            self._append(self._capture.take())
        finally:
            self.release()

    def release(self) -> None:
        """Close the file as it is (no end-of-stream marker: it ends at a batch boundary)."""
        if self.fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self.fd)
            self.fd = -1


class SegmentFiles:
    """Appends record batches to the segments of one rank, one open segment per table.

    ``rows_written`` counts the rows of complete batches in files of the current run
    directory; rows in files that disappeared are moved to ``rows_lost`` (:meth:`verify`).
    """

    def __init__(
        self,
        path: str,
        rank: int,
        segment_bytes: int,
        directory: RunDirectory | None = None,
        on_taken: OnError | None = None,
        compression: str | None = None,
        compact: bool | None = None,
    ):
        self.path = path
        #: convert each segment closed whole into a Parquet file (compaction.py)
        self.compact = COMPACT if compact is None else compact
        self._compact_warned = False
        self._compactor: ThreadPoolExecutor | None = None
        self._compacting: dict[str, Future] = {}  # stream name -> its compaction
        # Each record batch's buffers are compressed on their own, so every flushed batch
        # still reads back after a crash; a reader needs nothing but pyarrow.
        self._options = pa.ipc.IpcWriteOptions(compression=compression)
        #: ``on_taken(exc, path)``: a new segment's name was taken (a link or a file in the
        #: way): it is never written through, and the segment takes the next number.
        self.on_taken = on_taken
        self.rank = rank
        self.segment_bytes = segment_bytes
        self.directory = directory if directory is not None else RunDirectory(path, rank)
        self.rows_written: dict[str, int] = {t: 0 for t in SCHEMAS}
        self.rows_lost: dict[str, int] = {t: 0 for t in SCHEMAS}
        self._open: dict[str, _Segment] = {}
        self._next: dict[str, int] = {}  # number of the next segment to open, per table
        #: per table, the first segment this writer opened in the current directory (the
        #: segments before it were there already: a restarted job's)
        self.first_segment: dict[str, int] = {}
        # closed segments: (table, name, (st_dev, st_ino), rows)
        self._done: list[tuple[str, str, tuple[int, int], int]] = []

    def _names(self) -> list[str]:
        if self.directory.fd is not None:
            return self.directory.names()
        return os.listdir(self.path)

    def number_after_existing(self) -> None:
        """Number new segments after those a previous process left in ``path``: never overwrite."""
        for name in self._names():
            parsed = parse_segment_name(name)
            if parsed and parsed[1] == self.rank and parsed[0] in SCHEMAS:
                t, _rank, seg = parsed
                self._next[t] = max(self._next.get(t, 0), seg + 1)

    def path_for(self, table: str) -> str:
        """The file a write to ``table`` goes to: its open segment, else the next one to open."""
        seg = self._open.get(table)
        if seg is not None:
            return seg.path
        return os.path.join(self.path, segment_name(table, self.rank, self._next.get(table, 0)))

    def _open_segment(self, table: str) -> _Segment:
        if self.directory.fd is None:
            self.directory.open()
        attempts = 0
        while True:
            number = self._next.get(table, 0)
            try:
                seg = _Segment(
                    self.directory,
                    segment_name(table, self.rank, number),
                    _SCHEMAS[table],
                    self._options,
                )
            except FileExistsError as exc:
                # Something is where the next segment should go (a file another process
                # made, a planted link): never overwritten; the run goes on after it.
                self._next[table] = number + 1
                attempts += 1
                if attempts >= _NAME_ATTEMPTS:
                    raise
                if self.on_taken is not None:
                    self.on_taken(
                        exc, os.path.join(self.path, segment_name(table, self.rank, number))
                    )
                continue
            self._next[table] = number + 1
            self.first_segment.setdefault(table, number)
            return seg

    def write(self, table: str, batch: pa.RecordBatch) -> None:
        """Append ``batch`` to the open segment of ``table``, opening the next one if needed.

        On an error the segment is closed where it is (its last complete batch) and the
        error raised; the next write opens the next segment."""
        seg = self._open.get(table)
        if seg is None:
            seg = self._open[table] = self._open_segment(table)
        try:
            seg.append(batch)
        except BaseException:
            self._retire(table)
            raise
        self.rows_written[table] += batch.num_rows

    def _retire(self, table: str) -> None:
        seg = self._open.pop(table)
        seg.release()
        if seg.size == 0:  # nothing of it reached the disk: no empty file left behind
            with contextlib.suppress(OSError):
                if self.directory.fd is not None and self.directory.exists(seg.name, seg.identity):
                    os.unlink(seg.name, dir_fd=self.directory.fd)
                    self._next[table] = min(self._next[table], self._number(seg.name))
        if seg.rows:
            self._done.append((table, seg.name, seg.identity, seg.rows))

    @staticmethod
    def _number(name: str) -> int:
        parsed = parse_segment_name(name)
        return parsed[2] if parsed else 0

    def flush(self, tables: list[str], on_error: OnError) -> None:
        """Close each of ``tables``' segments now over size (what was written is already
        with the OS: nothing is buffered here)."""
        for table in tables:
            seg = self._open.get(table)
            if seg is None:  # abandoned after an error
                continue
            if seg.size >= self.segment_bytes:
                del self._open[table]  # the next write opens the next segment
                self._close(table, seg, on_error)

    def close_all(self, on_error: OnError) -> None:
        """Close every open segment, writing its end-of-stream marker."""
        while self._open:  # on_error may abandon() the rest
            table = next(iter(self._open))
            self._close(table, self._open.pop(table), on_error)
        # Compactions still running after this go on in the background (on their own
        # descriptor); the stream is readable until the Parquet file replaces it.
        self.collect(wait=COMPACT_WAIT)
        if self._compactor is not None:
            self._compactor.shutdown(wait=False)
            self._compactor = None

    def _close(self, table: str, seg: _Segment, on_error: OnError) -> None:
        """Close a segment whole, then compact it into its Parquet file."""
        try:
            seg.close()
        except (OSError, pa.ArrowException) as exc:
            on_error(exc, seg.path)
            self._done.append((table, seg.name, seg.identity, seg.rows))
            return
        self._done.append((table, seg.name, seg.identity, seg.rows))
        if self.compact and seg.rows and self.directory.fd is not None:
            if self._compactor is None:
                self._compactor = ThreadPoolExecutor(1, thread_name_prefix="torchvitals-compact")
            # its own descriptor of the directory: the writer may close its own first
            fd = os.dup(self.directory.fd)
            try:
                future = self._compactor.submit(_compact_and_close, fd, seg.name, seg.identity)
            except RuntimeError:  # at interpreter exit no thread starts: compact here
                future = Future()
                try:
                    future.set_result(_compact_and_close(fd, seg.name, seg.identity))
                except (OSError, ValueError, pa.ArrowException) as exc:
                    future.set_exception(exc)
            self._compacting[seg.name] = future

    def collect(self, wait: float | None = 0.0) -> None:
        """Take in the compactions that finished (waiting up to ``wait`` seconds in all
        for the others; None: until they finish): each segment's entry follows its file
        to the Parquet name; a failure is warned about once (the stream stays)."""
        deadline = None if wait is None else time.monotonic() + wait
        for name, future in list(self._compacting.items()):
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                target, identity = future.result(timeout=left)
            except FutureTimeout:
                continue
            except (OSError, ValueError, pa.ArrowException) as exc:
                del self._compacting[name]
                if not self._compact_warned:
                    self._compact_warned = True
                    warnings.warn(
                        f"torchvitals: could not compact {os.path.join(self.path, name)} into "
                        f"a Parquet file ({type(exc).__name__}: {exc}); it stays an Arrow "
                        "stream, which load_run reads (further failures are not warned about)",
                        RuntimeWarning,
                        stacklevel=2,
                    )
                continue
            del self._compacting[name]
            self._done = [
                (t, target, identity, rows) if n == name else (t, n, ident, rows)
                for t, n, ident, rows in self._done
            ]

    def abandon(self) -> None:
        """Close every file without writing more (after an I/O error: writing is over)."""
        for table in list(self._open):
            seg = self._open.pop(table)
            seg.release()
            self._done.append((table, seg.name, seg.identity, seg.rows))

    def verify(self, everything: bool = False) -> dict[str, int]:
        """Move the rows of segments that are no longer on disk (deleted or replaced) from
        ``rows_written`` to ``rows_lost``: the open segments (one ``fstat`` each), and with
        ``everything`` the closed ones too. The rows lost now, per table."""
        self.collect()
        lost: dict[str, int] = {}
        for table, seg in list(self._open.items()):
            if seg.deleted() or (everything and not self.directory.exists(seg.name, seg.identity)):
                del self._open[table]
                seg.release()
                lost[table] = lost.get(table, 0) + seg.rows
        if everything:
            kept = []
            for entry in self._done:
                table, name, identity, rows = entry
                if self.directory.exists(name, identity) or self._compacted_away(name):
                    kept.append(entry)
                else:
                    lost[table] = lost.get(table, 0) + rows
            self._done = kept
        for table, rows in lost.items():
            self.rows_written[table] -= rows
            self.rows_lost[table] += rows
        return {t: n for t, n in lost.items() if n}

    def _compacted_away(self, name: str) -> bool:
        """A segment being compacted whose Parquet file took its place meanwhile."""
        if name not in self._compacting or self.directory.fd is None:
            return False
        parsed = parse_segment_file(name)
        target = segment_name(parsed[0], parsed[1], parsed[2], PARQUET) if parsed else name
        try:
            os.stat(target, dir_fd=self.directory.fd, follow_symlinks=False)
        except OSError:
            return False
        return True

    def directory_lost(self) -> dict[str, int]:
        """The run directory is gone: every row written so far is lost. Let go of the
        files and start numbering afresh; the rows lost, per table."""
        for seg in self._open.values():
            seg.release()
        self._open.clear()
        self._done.clear()
        self._compacting.clear()  # they go on in the lost directory, harmlessly
        self._next.clear()
        self.first_segment.clear()
        lost = {t: n for t, n in self.rows_written.items() if n}
        for table, rows in lost.items():
            self.rows_lost[table] += rows
            self.rows_written[table] = 0
        return lost
