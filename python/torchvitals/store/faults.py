"""Write failures of a RunWriter: counted, warned about once, or (strict) raised later.

Telemetry must never crash or stall training, so by default a failure is counted
(``write_errors``) and warned about once. Three kinds:

- an **I/O error while writing** (a full disk, a file system error, the directory gone)
  stalls writing: the items of the cycle that failed are dropped and counted, and
  writing is tried again after a back-off (0.5 s, doubling up to 30 s; each try is
  counted in ``write_retries``). When a try succeeds writing resumes, with a warning
  saying how much was dropped meanwhile. ``write_errors`` counts stalls, not tries.
- an **I/O error at start** (the directory cannot be created or opened) disables
  writing for the rest of the run: ``on_disable`` is called; later items are dropped.
- an **item error** (a columns callable raised, or the columns are invalid) loses
  only that item.

With ``strict`` the first error is kept instead of warned about, and raised on the
training thread by :meth:`FaultRecord.raise_pending` (at the next submit/flush/close):
it happens on the writer thread, where raising would only kill the thread.
"""

from __future__ import annotations

import threading
import time
import warnings
from collections.abc import Callable

__all__ = ["FaultRecord"]

FIRST_BACKOFF = 0.5
MAX_BACKOFF = 30.0


class FaultRecord:
    """The failures of one writer, reported from either thread."""

    def __init__(
        self,
        *,
        run_path: str,
        strict: bool,
        on_disable: Callable[[], None],
        clock: Callable[[], float] = time.monotonic,
    ):
        self.strict = strict
        self.write_errors = 0  #: I/O stalls plus items whose columns raised or were invalid
        self.write_retries = 0  #: tries to write again after an I/O error
        self.io_error: BaseException | None = None  #: the error that disabled writing (at start)
        self.stalled: BaseException | None = None  #: the I/O error writing waits out now
        self.pending: BaseException | None = None  #: strict: to raise on the training thread
        self._run_path = run_path
        self._on_disable = on_disable
        self._clock = clock
        self._lock = threading.Lock()
        self._warned_io = False
        self._warned_item = False
        self._backoff = FIRST_BACKOFF
        self._retry_at = 0.0
        self._stalled_since = 0.0
        self._dropped_at_stall = 0

    @property
    def writing_disabled(self) -> bool:
        return self.io_error is not None

    def fail_io(self, exc: BaseException, where: str) -> None:
        """An I/O failure at start, at path ``where``: writing is disabled for the run."""
        with self._lock:
            self.write_errors += 1
            first = self.io_error is None
            if first:
                self.io_error = exc
                if self.strict and self.pending is None:
                    self.pending = exc
        if not first:
            return
        self._on_disable()
        self._warn_io(
            f"torchvitals: cannot write telemetry to {where}: {type(exc).__name__}: {exc}. "
            "Telemetry writing is disabled for this run; further batches are dropped "
            "(counted in RunWriter.dropped / write_errors). Training continues."
        )

    # ------------------------------------------------------------------ stalls (writer thread)

    def stall(self, exc: BaseException, where: str, dropped: int) -> None:
        """A write failed at ``where``: wait (back-off) before writing again. ``dropped``
        is the writer's drop count before this cycle's items were lost."""
        now = self._clock()
        with self._lock:
            first = self.stalled is None
            if first:
                self.write_errors += 1
                self.stalled = exc
                self._stalled_since = now
                self._dropped_at_stall = dropped
                self._backoff = FIRST_BACKOFF
                if self.strict and self.pending is None:
                    self.pending = exc
            else:
                self._backoff = min(self._backoff * 2, MAX_BACKOFF)
            self._retry_at = now + self._backoff
        if first:
            self._warn_io(
                f"torchvitals: cannot write telemetry to {where}: {type(exc).__name__}: {exc}. "
                "Batches are dropped and counted (RunWriter.dropped / write_errors) and "
                "writing is tried again with a back-off; training continues."
            )

    def may_write(self, force: bool = False) -> bool:
        """Whether the writer thread should write now: not stalled, or the back-off is
        over (``force``: closing, one last try). A try is counted."""
        if self.stalled is None:
            return True
        if not force and self._clock() < self._retry_at:
            return False
        with self._lock:
            self.write_retries += 1
        return True

    def wrote(self, dropped: int) -> None:
        """A write succeeded: a stall, if any, is over."""
        if self.stalled is None:
            return
        with self._lock:
            exc, self.stalled = self.stalled, None
            seconds = self._clock() - self._stalled_since
        if not self.strict:
            warnings.warn(
                f"torchvitals: writing to {self._run_path} resumed after {seconds:.1f} s "
                f"({type(exc).__name__}); {dropped - self._dropped_at_stall} batch(es) "
                "were dropped meanwhile",
                RuntimeWarning,
                stacklevel=2,
            )

    # ------------------------------------------------------------------ items

    def item_error(self, exc: BaseException, table: str, n: int) -> None:
        """Record that ``n`` items of ``table`` were lost to ``exc``."""
        with self._lock:
            self.write_errors += n
            if self.strict and self.pending is None:
                self.pending = exc
        if not self.strict and not self._warned_item:
            self._warned_item = True
            warnings.warn(
                f"torchvitals: dropped a {table!r} batch for {self._run_path}: "
                f"{type(exc).__name__}: {exc} "
                "(further failing batches are only counted in RunWriter.write_errors)",
                RuntimeWarning,
                stacklevel=2,
            )

    def name_taken(self, exc: BaseException, where: str) -> None:
        """A file the writer was to create exists (a link planted, another process's
        file): counted and warned; the writer uses the next name."""
        with self._lock:
            self.write_errors += 1
            if self.strict and self.pending is None:
                self.pending = exc
        if not self.strict:
            warnings.warn(
                f"torchvitals: not writing to {where}: {type(exc).__name__}: {exc}; it is left "
                "alone and the segment takes the next number",
                RuntimeWarning,
                stacklevel=2,
            )

    def warn(self, message: str) -> None:
        """A problem that loses nothing more from now on (a vanished directory, a lost
        file): always warned, never raised."""
        warnings.warn(message, RuntimeWarning, stacklevel=2)

    def _warn_io(self, message: str) -> None:
        if not self.strict and not self._warned_io:
            self._warned_io = True
            warnings.warn(message, RuntimeWarning, stacklevel=3)

    def raise_pending(self) -> None:
        """Strict mode: raise the kept error, once (no-op when there is none)."""
        exc, self.pending = self.pending, None
        if exc is not None:
            raise exc
