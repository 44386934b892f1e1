"""Write failures of a RunWriter: counted, warned about once, or (strict) raised later.

Telemetry must never crash or stall training, so by default a failure is counted
(``write_errors``) and warned about once. Two kinds:

- an **I/O error** (directory, disk, file) disables writing for the rest of the run:
  the first one calls ``on_disable``; later items are dropped.
- an **item error** (a columns callable raised, or the columns are invalid) loses
  only that item.

With ``strict`` the first error is kept instead of warned about, and raised on the
training thread by :meth:`FaultRecord.raise_pending` (at the next submit/flush/close):
it happens on the writer thread, where raising would only kill the thread.
"""

from __future__ import annotations

import threading
import warnings
from collections.abc import Callable

__all__ = ["FaultRecord"]


class FaultRecord:
    """The failures of one writer, reported from either thread."""

    def __init__(self, *, run_path: str, strict: bool, on_disable: Callable[[], None]):
        self.strict = strict
        self.write_errors = 0  #: I/O failures plus items whose columns raised or were invalid
        self.io_error: BaseException | None = None  #: the first I/O error, which disabled writing
        self.pending: BaseException | None = None  #: strict: to raise on the training thread
        self._run_path = run_path
        self._on_disable = on_disable
        self._lock = threading.Lock()
        self._warned_io = False
        self._warned_item = False

    @property
    def writing_disabled(self) -> bool:
        return self.io_error is not None

    def fail_io(self, exc: BaseException, where: str) -> None:
        """Record an I/O failure at path ``where``; the first one disables writing."""
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
        if not self.strict and not self._warned_io:
            self._warned_io = True
            warnings.warn(
                f"torchvitals: cannot write telemetry to {where}: {type(exc).__name__}: {exc}. "
                "Telemetry writing is disabled for this run; further batches are dropped "
                "(counted in RunWriter.dropped / write_errors). Training continues.",
                RuntimeWarning,
                stacklevel=2,
            )

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

    def raise_pending(self) -> None:
        """Strict mode: raise the kept error, once (no-op when there is none)."""
        exc, self.pending = self.pending, None
        if exc is not None:
            raise exc
