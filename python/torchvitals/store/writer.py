"""Asynchronous, bounded, crash-safe writer of a torchvitals run directory.

The training thread calls :meth:`RunWriter.submit`, which only appends to a
bounded in-memory queue. A daemon thread turns the queued items into Arrow
record batches (one per table per cycle), appends them to Arrow IPC *stream*
segments and flushes them to the OS at least every ``flush_interval`` seconds.
Because a stream is a plain sequence of self-delimiting messages, a process
killed at any moment leaves files whose every flushed record batch reads back
(see ``reader.load_run`` and ``docs/schema.md``).

:class:`RunWriter` only coordinates; each part lives on its own:

- ``submit_queue.py``: the queue between the two threads, and the drop count;
- ``table_builder.py``: submitted columns -> one record batch per table;
- ``segments.py``: the open segment file per table, numbering and rotation;
- ``faults.py``: write errors, warned about once or raised in strict mode;
- ``manifest.py`` and ``layout.py``: the manifest and the file names;
- ``rundir.py``: the directory this writer owns (its lock, its identity, safe creation).

No silent loss: one writer per rank and directory (a second one is refused in strict
mode, else moved to ``{path}.1``, ``{path}.2``, ... with a warning); a directory deleted
or replaced while the run writes is noticed at the next flush (warned, its rows counted
in ``rows_lost``, writing goes on in a new directory at the path); a failed write (a
full disk) is retried with a back-off and writing resumes when it succeeds; the closing
manifest's ``rows_written`` counts the rows of the segments on disk.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import threading
import time
import warnings
import weakref
from collections.abc import Callable, Mapping
from typing import Any, Literal

import pyarrow as pa

from .faults import FaultRecord
from .manifest import ManifestFile
from .rundir import RunDirectory, RunDirectoryInUse
from .schema import DROPPED_SCALAR, SCHEMAS
from .segments import SegmentFiles
from .submit_queue import SubmitQueue, Taken
from .table_builder import Columns, TableBuilder, warm_up

__all__ = ["RunDirectoryInUse", "RunWriter"]

#: A second writer of a rank tries ``{path}.1`` ... ``{path}.{_MAX_SUFFIX}``.
_MAX_SUFFIX = 99


_LIVE: weakref.WeakSet[RunWriter] = weakref.WeakSet()


@atexit.register
def _close_all_at_exit() -> None:  # pragma: no cover - exercised by the crash tests' subprocess
    for w in list(_LIVE):
        with contextlib.suppress(Exception):
            w.close(timeout=5.0)


class RunWriter:
    """Append telemetry of one rank to a run directory, off the training thread.

    Parameters
    ----------
    path: run directory (created if needed).
    manifest: JSON-serialisable run description; written at start to
        ``manifest.rank{R}.json`` and rewritten at close with ``closed_at``,
        ``dropped_batches``, ``write_errors`` and ``rows_written``.
    rank: this process's rank; part of every file name and the default ``rank`` column.
    flush_interval: seconds; queued items are written and flushed to the OS at least this often.
    max_pending: bound of the submit queue (items, not rows).
    on_full: ``"drop"`` (never block; count the item in ``dropped``) or ``"block"`` (wait).
    strict: re-raise write errors (I/O and item conversion) on the training thread,
        at the next ``submit``/``flush``/``close``, instead of warning once and counting.
    segment_bytes: rotate a table's segment file once it is larger than this.
    compression: ``"zstd"`` (default), ``"lz4"`` or ``None``: the codec of each record
        batch's buffers (pyarrow, polars and duckdb read both).
    start_step: where this rank already wrote in ``path`` (a restarted job), the step
        training resumes at, from a checkpoint: this writer is the rank's next attempt
        (every row's ``attempt``), and the reader drops the earlier attempts' rows from
        that step on. None: the run goes on after the last step recorded (warned about
        when there is one). See ``manifest.py``.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        manifest: Mapping[str, Any],
        rank: int = 0,
        flush_interval: float = 1.0,
        max_pending: int = 256,
        on_full: Literal["block", "drop"] = "drop",
        strict: bool = False,
        segment_bytes: int = 256 << 20,
        compression: Literal["zstd", "lz4"] | None = "zstd",
        start_step: int | None = None,
    ):
        if on_full not in ("block", "drop"):
            raise ValueError(f"on_full must be 'block' or 'drop', got {on_full!r}")
        if max_pending < 1:
            raise ValueError("max_pending must be >= 1")
        if flush_interval <= 0:
            raise ValueError("flush_interval must be > 0")
        if start_step is not None and not (
            isinstance(start_step, int) and not isinstance(start_step, bool) and start_step >= 0
        ):
            raise ValueError(f"start_step must be a non-negative integer, got {start_step!r}")
        self.path = os.fspath(path)
        self.rank = int(rank)
        self.flush_interval = float(flush_interval)
        self.max_pending = int(max_pending)
        self.on_full = on_full
        self.strict = bool(strict)
        self.segment_bytes = int(segment_bytes)
        if compression is not None and (
            compression not in ("zstd", "lz4") or not pa.Codec.is_available(compression)
        ):
            available = [c for c in ("zstd", "lz4") if pa.Codec.is_available(c)]
            raise ValueError(
                f"compression={compression!r}: use one of {available} (this pyarrow's codecs) "
                "or None"
            )
        self.compression = compression

        self._queue = SubmitQueue(self.max_pending, on_full)
        self._faults = FaultRecord(
            run_path=self.path, strict=self.strict, on_disable=self._stop_writing
        )
        self._directory = RunDirectory(self.path, self.rank)
        self._segments = SegmentFiles(
            self.path,
            self.rank,
            self.segment_bytes,
            directory=self._directory,
            on_taken=self._name_taken,
            compression=self.compression,
        )
        self._dropped_row = _DroppedRow()
        self._manifest = ManifestFile(
            self.path,
            self.rank,
            manifest,
            settings={
                "flush_interval": self.flush_interval,
                "max_pending": self.max_pending,
                "on_full": self.on_full,
                "segment_bytes": self.segment_bytes,
                "compression": self.compression,
            },
            directory=self._directory,
        )
        self._start_manifest_due = False  # the directory was re-created: write it again
        self.run_dir_lost = 0  #: times the run directory vanished or was replaced
        self._pid = os.getpid()  # a forked child shares this object, never the files
        self._warned_fork = False
        self._thread = threading.Thread(
            target=self._run, name=f"torchvitals-writer-rank{self.rank}", daemon=True
        )
        try:
            self._open_directory()
            self._manifest.begin_attempt(start_step)
            self._segments.number_after_existing()
            self._manifest.write_start()
        except OSError as exc:
            self._faults.fail_io(exc, self._manifest.path)
            if self.strict:
                raise  # the caller is right here: no need to wait for the next submit
        if not self._faults.writing_disabled:
            self._thread.start()
        _LIVE.add(self)

    def _in_forked_child(self) -> bool:
        """A forked child never writes the parent's run (its writer thread did not
        survive the fork, and the files are the parent's): refuse, and say so once."""
        if not self._warned_fork:
            self._warned_fork = True
            warnings.warn(
                f"torchvitals: process {os.getpid()} is a fork of the one writing {self.path}; "
                "it records nothing there (attach a Monitor of its own to record in it)",
                RuntimeWarning,
                stacklevel=3,
            )
        return False

    def _open_directory(self) -> None:
        """Open the run directory and take this rank's lock; if another live writer
        holds it, refuse (strict) or move to the first free ``{path}.{k}``."""
        try:
            self._directory.open()
            return
        except RunDirectoryInUse as exc:
            if self.strict:
                raise
            reason = str(exc)
        for k in range(1, _MAX_SUFFIX + 1):
            path = f"{self.path}.{k}"
            directory = RunDirectory(path, self.rank)
            try:
                directory.open()
            except RunDirectoryInUse:
                continue
            warnings.warn(
                f"{reason}. This writer writes to {path} instead.", RuntimeWarning, stacklevel=4
            )
            self.path = path
            self._directory = directory
            self._faults._run_path = path
            self._segments = SegmentFiles(
                path,
                self.rank,
                self.segment_bytes,
                directory=directory,
                on_taken=self._name_taken,
                compression=self.compression,
            )
            self._manifest.directory = directory
            self._manifest.path = os.path.join(path, self._manifest.name)
            return
        raise OSError(f"{reason}; and so are {self.path}.1 to .{_MAX_SUFFIX}")

    # ------------------------------------------------------------------ training thread

    def submit(self, table: str, columns: Callable[[], Columns] | Columns) -> bool:
        """Queue one item for ``table``; ``True`` if queued, ``False`` if dropped.

        ``columns`` is a mapping of column name to value (numpy array, list, CPU
        tensor, or a scalar broadcast to all rows) or a callable returning one; a
        callable is called on the writer thread.
        """
        if table not in SCHEMAS:
            raise ValueError(
                f"unknown torchvitals table {table!r}; known tables: {', '.join(SCHEMAS)}"
            )
        self._faults.raise_pending()
        if os.getpid() != self._pid:
            return self._in_forked_child()
        return self._queue.put((table, columns), writer_alive=self._thread.is_alive)

    def flush(self, timeout: float | None = None) -> None:
        """Block until every item submitted so far is written and flushed to the OS."""
        self._queue.wait_processed(timeout, writer_alive=self._thread.is_alive)
        self._faults.raise_pending()

    def close(self, timeout: float = 30.0) -> None:
        """Drain the queue (up to ``timeout`` s), close the segments, finalize the manifest."""
        if os.getpid() != self._pid:
            return  # a forked child: the files and the manifest are the parent's
        if self._queue.closed:
            self._faults.raise_pending()
            return
        self._queue.close()
        if self._thread.is_alive():
            self._thread.join(timeout)
            if self._thread.is_alive():
                warnings.warn(
                    f"torchvitals: writer for {self.path} did not finish within {timeout:g}s; "
                    f"{len(self._queue)} queued item(s) may be lost",
                    RuntimeWarning,
                    stacklevel=2,
                )
        _LIVE.discard(self)
        if not self._faults.writing_disabled:
            if not self._thread.is_alive():  # else the thread still owns the segments
                self._check_directory(everything=True)
            try:
                self._manifest.write_closed(
                    dropped=self.dropped,
                    write_errors=self.write_errors,
                    rows_written=self.rows_written,
                    rows_lost=self.rows_lost,
                    write_retries=self.write_retries,
                    run_dir_lost=self.run_dir_lost,
                    first_segment=self._segments.first_segment,
                )
            except OSError as exc:
                self._faults.stall(exc, self._manifest.path, self.dropped)
        self._directory.close()
        self._faults.raise_pending()

    def __enter__(self) -> RunWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def attempt(self) -> int:
        """This writer's attempt in the run directory (0 in a new one)."""
        return self._manifest.attempt

    @property
    def start_step(self) -> int:
        """The step this attempt starts at (``start_step``, or after the last recorded)."""
        return self._manifest.start_step

    @property
    def pending(self) -> int:
        """Items currently queued."""
        return len(self._queue)

    @property
    def closed(self) -> bool:
        return self._queue.closed

    @property
    def dropped(self) -> int:
        """Items not written (queue full, or after a write failure)."""
        return self._queue.dropped

    @property
    def write_errors(self) -> int:
        """I/O failures plus items whose columns raised or were invalid."""
        return self._faults.write_errors

    @property
    def rows_written(self) -> dict[str, int]:
        """Rows in the segments on disk, per table (rows of files that disappeared are
        in ``rows_lost``)."""
        return self._segments.rows_written

    @property
    def rows_lost(self) -> dict[str, int]:
        """Rows written to files that were deleted (or whose directory was), per table."""
        return self._segments.rows_lost

    @property
    def write_retries(self) -> int:
        """Tries to write again after an I/O error (see ``faults.py``)."""
        return self._faults.write_retries

    def _stop_writing(self) -> None:
        """The first I/O error disabled writing: refuse new items, and let go of the files.

        Only the writer thread touches the segment files, so only it lets go of them (a
        failure on the training thread comes before the thread starts or after it ends).
        """
        self._queue.refuse()
        if threading.current_thread() is self._thread:
            self._segments.abandon()

    # ------------------------------------------------------------------ writer thread

    def _run(self) -> None:
        with contextlib.suppress(Exception):  # a real problem resurfaces on the first item
            warm_up()
        self._queue.ready()
        next_flush = time.monotonic() + self.flush_interval
        while True:
            taken: Taken = self._queue.take(next_flush)
            try:
                self._write(taken.items, closing=taken.closing)
            except BaseException as exc:  # never let the thread die silently
                self._faults.item_error(exc, "<writer>", len(taken.items))
            next_flush = time.monotonic() + self.flush_interval
            if self._queue.processed(taken):
                break
        self._segments.close_all(on_error=self._close_failed)
        self._queue.all_processed()

    def _name_taken(self, exc: BaseException, where: str) -> None:
        self._faults.name_taken(exc, where)

    def _close_failed(self, exc: BaseException, where: str) -> None:
        self._faults.stall(exc, where, self.dropped)

    def _check_directory(self, everything: bool = False) -> None:
        """Notice a run directory deleted or replaced, or segment files removed, since
        the last check: warn, count the rows lost, and go on in a new directory."""
        what = self._directory.check()
        if what is None:
            lost = self._segments.verify(everything)
            if lost:
                self._faults.warn(
                    f"torchvitals: segment file(s) of {self.path} were removed while the run "
                    f"was writing; {_rows(lost)} lost (counted in the manifest's rows_lost)"
                )
            return
        lost = self._segments.directory_lost()
        self.run_dir_lost += 1
        self._directory.close()
        self._faults.warn(
            f"torchvitals: run directory {self.path} was {what} while the run was writing; "
            f"{_rows(lost) if lost else 'no rows'} written to it are lost (counted in the "
            f"manifest's rows_lost). Writing goes on in a new {self.path}."
        )
        self._start_manifest_due = True
        self._reopen()

    def _reopen(self) -> bool:
        """Re-create the directory and write the start manifest after it vanished."""
        try:
            self._directory.open()
            self._segments.number_after_existing()
            self._manifest.write_start()
        except (OSError, RunDirectoryInUse) as exc:
            self._directory.close()
            self._faults.stall(exc, self.path, self.dropped)
            return False
        self._start_manifest_due = False
        return True

    def _write(self, items: list[tuple[str, Any]], closing: bool = False) -> None:
        """One cycle: the items taken, as one record batch per table, appended; then the
        directory checked and full segments rotated."""
        if self._faults.writing_disabled:
            self._queue.lose(len(items))
            return
        if not self._faults.may_write(force=closing) or (
            self._start_manifest_due and not self._reopen()
        ):
            self._queue.lose(len(items))  # stalled: dropped and counted, tried again later
            return
        builders = self._build(items)
        # the torchvitals/dropped row is not a submitted item: not lost if its batch fails
        synthetic = self._dropped_row.add_if_changed(
            builders, self._queue.dropped, self.rank, self.attempt
        )
        written = []
        failed = False
        for table, b in builders.items():
            if not b.items:
                continue
            lost = b.items - (synthetic if table == "scalars" else 0)
            try:
                batch = b.build()
            except Exception as exc:
                self._faults.item_error(exc, table, lost)
                continue
            if self._faults.writing_disabled or failed:
                self._queue.lose(lost)
                continue
            try:
                self._segments.write(table, batch)
            except (OSError, pa.ArrowException) as exc:
                failed = True
                self._faults.stall(exc, self._segments.path_for(table), self.dropped)
                self._queue.lose(lost)
                continue
            written.append(table)
        if written and not failed:
            self._faults.wrote(self.dropped)
        self._check_directory()
        self._segments.flush(written, on_error=self._close_failed)

    def _build(self, items: list[tuple[str, Any]]) -> dict[str, TableBuilder]:
        """The items' columns, added to one builder per table (a failing item is skipped)."""
        builders: dict[str, TableBuilder] = {}
        for table, cols in items:
            b = builders.get(table)
            if b is None:
                b = builders[table] = TableBuilder(table, self.rank, self.attempt)
            try:
                b.add(cols() if callable(cols) else cols)
            except Exception as exc:
                self._faults.item_error(exc, table, 1)
            self._dropped_row.saw(b.max_step)
        return builders


def _rows(lost: dict[str, int]) -> str:
    return ", ".join(f"{n} {t} row(s)" for t, n in lost.items())


class _DroppedRow:
    """The ``torchvitals/dropped`` scalar: the running drop count, in the next cycle after
    it changes. Drops have no step, so the row takes the highest step written so far."""

    def __init__(self) -> None:
        self._max_step = 0
        self._recorded = 0  # the count in the last row written

    def saw(self, step: int | None) -> None:
        if step is not None:
            self._max_step = max(self._max_step, step)

    def add_if_changed(
        self, builders: dict[str, TableBuilder], dropped: int, rank: int, attempt: int
    ) -> int:
        """Add a row to the ``scalars`` builder if the count changed; the rows added (0 or 1)."""
        if dropped == self._recorded:
            return 0
        b = builders.get("scalars")
        if b is None:
            b = builders["scalars"] = TableBuilder("scalars", rank, attempt)
        b.add({"step": self._max_step, "name": DROPPED_SCALAR, "value": float(dropped)})
        self._recorded = dropped
        return 1
