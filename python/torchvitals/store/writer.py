"""Asynchronous, bounded, crash-safe writer of a torchvitals run directory.

The training thread calls :meth:`RunWriter.submit`, which only appends to a
bounded in-memory queue. A daemon thread turns the queued items into Arrow
record batches (one per table per cycle), appends them to Arrow IPC *stream*
segments and flushes them to the OS at least every ``flush_interval`` seconds.
Because a stream is a plain sequence of self-delimiting messages, a process
killed at any moment leaves files whose every flushed record batch reads back
(see ``run.load_run`` and ``docs/schema.md``).

Layout (one set of files per rank)::

    {path}/manifest.rank{R}.json
    {path}/{table}.rank{R}.{seg:06d}.arrows
"""

from __future__ import annotations

import atexit
import contextlib
import datetime as _dt
import json
import os
import re
import threading
import time
import warnings
import weakref
from collections import deque
from collections.abc import Callable, Mapping
from typing import Any, Literal

import numpy as np
import pyarrow as pa

from .schema import DROPPED_SCALAR, SCHEMA_VERSION, SCHEMAS
from .table_builder import Columns, TableBuilder, warm_up

__all__ = ["RunWriter", "manifest_name", "segment_name", "write_json_atomic"]


#: File names of segments and manifests, the inverse of segment_name and manifest_name.
SEGMENT_RE = re.compile(r"^(?P<table>[A-Za-z0-9_]+)\.rank(?P<rank>\d+)\.(?P<seg>\d+)\.arrows$")
MANIFEST_RE = re.compile(r"^manifest\.rank(?P<rank>\d+)\.json$")


def segment_name(table: str, rank: int, seg: int) -> str:
    """File name of segment ``seg`` of ``table`` written by ``rank``."""
    return f"{table}.rank{rank}.{seg:06d}.arrows"


def manifest_name(rank: int) -> str:
    """File name of the manifest written by ``rank``."""
    return f"manifest.rank{rank}.json"


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="milliseconds")


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if type(obj).__module__.startswith("torch") and hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, (set, frozenset, tuple)):
        return list(obj)
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    return str(obj)


def write_json_atomic(path: str, obj: Any) -> None:
    """Write ``obj`` as JSON to ``path`` atomically (temp file, fsync, ``os.replace``)."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=2, sort_keys=True, default=_json_default)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


# --------------------------------------------------------------------------- writer


class _Segment:
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
    ):
        if on_full not in ("block", "drop"):
            raise ValueError(f"on_full must be 'block' or 'drop', got {on_full!r}")
        if max_pending < 1:
            raise ValueError("max_pending must be >= 1")
        if flush_interval <= 0:
            raise ValueError("flush_interval must be > 0")
        self.path = os.fspath(path)
        self.rank = int(rank)
        self.flush_interval = float(flush_interval)
        self.max_pending = int(max_pending)
        self.on_full = on_full
        self.strict = bool(strict)
        self.segment_bytes = int(segment_bytes)

        self.dropped = 0  #: items not written (queue full, or after a write failure)
        self.write_errors = 0  #: I/O failures plus items whose columns raised or were invalid
        self.rows_written: dict[str, int] = {t: 0 for t in SCHEMAS}

        self._cond = threading.Condition(threading.Lock())
        self._queue: deque[tuple[str, Any]] = deque()
        self._high_water = max(1, self.max_pending // 2)
        self._enq_seq = 0  # items enqueued so far
        self._done_seq = 0  # items processed (written, failed or dropped) so far
        self._flush_target = 0
        self._closing = False
        self._closed = False
        self._broken: BaseException | None = None  # first I/O error: writer disabled
        self._pending_exc: BaseException | None = None  # strict: to raise on the training thread
        self._warned_io = False
        self._warned_item = False
        self._dropped_recorded = 0
        self._max_step = 0
        self._segments: dict[str, _Segment] = {}
        self._next_seg: dict[str, int] = {}

        self._manifest = dict(manifest)
        self._manifest["schema_version"] = SCHEMA_VERSION
        self._manifest["rank"] = self.rank
        self._manifest.setdefault("started_at", _now())
        self._manifest["writer"] = {
            "flush_interval": self.flush_interval,
            "max_pending": self.max_pending,
            "on_full": self.on_full,
            "segment_bytes": self.segment_bytes,
        }
        self._manifest_path = os.path.join(self.path, manifest_name(self.rank))
        try:
            os.makedirs(self.path, exist_ok=True)
            self._scan_existing_segments()
            write_json_atomic(self._manifest_path, self._manifest)
        except OSError as exc:
            self._fail_io(exc, self._manifest_path, writer_thread=False)
            if self.strict:
                self._pending_exc = None
                raise
        self._thread = threading.Thread(
            target=self._run, name=f"torchvitals-writer-rank{self.rank}", daemon=True
        )
        if self._broken is None:
            self._thread.start()
        _LIVE.add(self)

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
        if self._pending_exc is not None:
            self._raise_pending()
        cond = self._cond
        with cond:
            if self._broken is not None or self._closing:
                self.dropped += 1
                return False
            queue = self._queue
            if len(queue) >= self.max_pending:
                if self.on_full == "drop":
                    self.dropped += 1
                    return False
                while (
                    len(queue) >= self.max_pending
                    and not self._closing
                    and self._broken is None
                    and self._thread.is_alive()
                ):
                    cond.notify_all()
                    cond.wait(0.1)
                if self._broken is not None or self._closing or len(queue) >= self.max_pending:
                    self.dropped += 1
                    return False
            queue.append((table, columns))
            self._enq_seq += 1
            n = len(queue)
            if n == 1 or n >= self._high_water:
                cond.notify_all()
        return True

    def flush(self, timeout: float | None = None) -> None:
        """Block until every item submitted so far is written and flushed to the OS."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            target = self._enq_seq
            self._flush_target = max(self._flush_target, target)
            self._cond.notify_all()
            while self._done_seq < target and self._thread.is_alive():
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    break
                self._cond.wait(remaining if remaining is not None else 0.5)
        if self._pending_exc is not None:
            self._raise_pending()

    def close(self, timeout: float = 30.0) -> None:
        """Drain the queue (up to ``timeout`` s), close the segments, finalize the manifest."""
        if self._closed:
            if self._pending_exc is not None:
                self._raise_pending()
            return
        self._closed = True
        with self._cond:
            self._closing = True
            self._cond.notify_all()
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
        if os.path.isdir(self.path):
            m = dict(self._manifest)
            m.update(
                closed_at=_now(),
                dropped_batches=self.dropped,
                write_errors=self.write_errors,
                rows_written=dict(self.rows_written),
            )
            try:
                write_json_atomic(self._manifest_path, m)
            except OSError as exc:
                self._fail_io(exc, self._manifest_path, writer_thread=False)
        if self._pending_exc is not None:
            self._raise_pending()

    def __enter__(self) -> RunWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def pending(self) -> int:
        """Items currently queued."""
        return len(self._queue)

    @property
    def closed(self) -> bool:
        return self._closed

    def _raise_pending(self) -> None:
        exc, self._pending_exc = self._pending_exc, None
        if exc is not None:
            raise exc

    # ------------------------------------------------------------------ writer thread

    def _run(self) -> None:
        with contextlib.suppress(Exception):  # a real problem resurfaces on the first item
            warm_up()
        cond = self._cond
        next_flush = time.monotonic() + self.flush_interval
        while True:
            with cond:
                while True:
                    if self._closing:
                        break
                    if self._queue and (
                        self._flush_target > self._done_seq
                        or len(self._queue) >= self._high_water
                        or time.monotonic() >= next_flush
                    ):
                        break
                    if not self._queue and self._flush_target > self._done_seq:
                        self._done_seq = self._enq_seq
                        cond.notify_all()
                        continue
                    cond.wait(max(0.0, next_flush - time.monotonic()) if self._queue else None)
                items = list(self._queue)
                self._queue.clear()  # same deque object: submit() may hold a reference
                seq = self._enq_seq
                closing = self._closing
                cond.notify_all()  # wake submitters blocked on a full queue
            try:
                self._process(items)
            except BaseException as exc:  # never let the thread die silently
                self._item_error(exc, "<writer>", len(items))
            next_flush = time.monotonic() + self.flush_interval
            with cond:
                self._done_seq = max(self._done_seq, seq)
                cond.notify_all()
                if closing and not self._queue:
                    break
        self._close_segments()
        with cond:
            self._done_seq = self._enq_seq
            cond.notify_all()

    def _process(self, items: list[tuple[str, Any]]) -> None:
        if self._broken is not None:
            with self._cond:
                self.dropped += len(items)
            return
        builders: dict[str, TableBuilder] = {}
        for table, cols in items:
            b = builders.get(table)
            if b is None:
                b = builders[table] = TableBuilder(table, self.rank)
            try:
                if callable(cols):
                    cols = cols()
                b.add(cols)
            except Exception as exc:
                self._item_error(exc, table, 1)
            if b.max_step is not None:
                self._max_step = max(self._max_step, b.max_step)
        dropped = self.dropped
        synthetic = 0  # the torchvitals/dropped row is not a submitted item
        if dropped != self._dropped_recorded:
            b = builders.get("scalars")
            if b is None:
                b = builders["scalars"] = TableBuilder("scalars", self.rank)
            b.add({"step": self._max_step, "name": DROPPED_SCALAR, "value": float(dropped)})
            self._dropped_recorded = dropped
            synthetic = 1
        touched = []
        for table, b in builders.items():
            lost = b.items - (synthetic if table == "scalars" else 0)  # items lost on failure
            if not b.items:
                continue
            try:
                batch = b.build()
            except Exception as exc:
                self._item_error(exc, table, lost)
                continue
            if self._broken is not None:
                with self._cond:
                    self.dropped += lost
                continue
            try:
                self._write_batch(table, batch)
            except (OSError, pa.ArrowException) as exc:
                self._fail_io(exc, self._segment_path(table))
                with self._cond:
                    self.dropped += lost
                continue
            self.rows_written[table] += batch.num_rows
            touched.append(table)
        for table in touched:
            seg = self._segments.get(table)
            if seg is None:
                continue
            try:
                seg.file.flush()
                if seg.file.tell() >= self.segment_bytes:
                    del self._segments[table]
                    seg.close()
            except (OSError, pa.ArrowException) as exc:
                self._fail_io(exc, seg.path)

    def _segment_path(self, table: str) -> str:
        seg = self._segments.get(table)
        if seg is not None:
            return seg.path
        return os.path.join(self.path, segment_name(table, self.rank, self._next_seg.get(table, 0)))

    def _write_batch(self, table: str, batch: pa.RecordBatch) -> None:
        """Append ``batch`` to the current segment of ``table`` (opening one if needed)."""
        seg = self._segments.get(table)
        if seg is None:
            n = self._next_seg.get(table, 0)
            seg = _Segment(
                os.path.join(self.path, segment_name(table, self.rank, n)), SCHEMAS[table]
            )
            self._next_seg[table] = n + 1
            self._segments[table] = seg
        seg.writer.write_batch(batch)

    def _close_segments(self) -> None:
        for table in list(self._segments):
            seg = self._segments.pop(table)
            try:
                seg.close()
            except (OSError, pa.ArrowException) as exc:
                self._fail_io(exc, seg.path)

    def _scan_existing_segments(self) -> None:
        """Number new segments after those a previous process left in ``path``: never overwrite."""
        for name in os.listdir(self.path):
            m = SEGMENT_RE.match(name)
            if m and int(m["rank"]) == self.rank and m["table"] in SCHEMAS:
                t = m["table"]
                self._next_seg[t] = max(self._next_seg.get(t, 0), int(m["seg"]) + 1)

    # ------------------------------------------------------------------ faults

    def _fail_io(self, exc: BaseException, where: str, *, writer_thread: bool = True) -> None:
        """Record an I/O failure; the first one disables writing (and warns once)."""
        with self._cond:
            self.write_errors += 1
            first = self._broken is None
            if first:
                self._broken = exc
                self._cond.notify_all()
            if self.strict and self._pending_exc is None and first:
                self._pending_exc = exc
        if first and writer_thread:  # only the writer thread owns the segment files
            for seg in list(self._segments.values()):
                with contextlib.suppress(Exception):
                    seg.file.close()
            self._segments.clear()
        if first and not self.strict and not self._warned_io:
            self._warned_io = True
            warnings.warn(
                f"torchvitals: cannot write telemetry to {where}: {type(exc).__name__}: {exc}. "
                "Telemetry writing is disabled for this run; further batches are dropped "
                "(counted in RunWriter.dropped / write_errors). Training continues.",
                RuntimeWarning,
                stacklevel=2,
            )

    def _item_error(self, exc: BaseException, table: str, n: int) -> None:
        with self._cond:
            self.write_errors += n
            if self.strict and self._pending_exc is None:
                self._pending_exc = exc
        if not self.strict and not self._warned_item:
            self._warned_item = True
            warnings.warn(
                f"torchvitals: dropped a {table!r} batch for {self.path}: "
                f"{type(exc).__name__}: {exc} "
                "(further failing batches are only counted in RunWriter.write_errors)",
                RuntimeWarning,
                stacklevel=2,
            )
