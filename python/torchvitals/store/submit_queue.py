"""The bounded queue between the training thread and the writer thread.

The training thread only appends here, so ``submit`` does no I/O and, with
``on_full="drop"``, never waits. The writer thread takes everything queued at once
when a write is due. Items are numbered as they are queued, so that a flush waits
for exactly the items submitted before it.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any, Literal, NamedTuple

__all__ = ["SubmitQueue", "Taken"]


class Taken(NamedTuple):
    """What the writer thread took from the queue in one go."""

    items: list[Any]
    seq: int  #: number of items queued up to and including these
    closing: bool  #: close() had been called: stop once nothing more is queued


#: Seconds a full queue in "drop" mode may wait for the writer thread to get ready.
STARTUP_GRACE = 5.0


class SubmitQueue:
    """A bounded FIFO of items, with the count of items that never got written."""

    def __init__(self, max_pending: int, on_full: Literal["block", "drop"]):
        self.max_pending = max_pending
        self.on_full = on_full
        self.dropped = 0  #: items not written: refused by put(), or lost later (lose())
        self.closed = False  #: close() was called: no more items
        self._refusing = False  # writing is disabled: no more items either
        self._cond = threading.Condition(threading.Lock())
        self._items: deque[Any] = deque()
        # Wake the writer before the queue is full, so a burst does not have to drop.
        self._high_water = max(1, max_pending // 2)
        self._enq_seq = 0  # items queued so far
        self._done_seq = 0  # items processed (written, failed or dropped) so far
        self._flush_target = 0  # the writer writes now until _done_seq reaches it
        # Until the writer thread is ready (pyarrow's first use takes a few tenths of a
        # second), a full queue makes "drop" wait too, for at most STARTUP_GRACE seconds:
        # a fast loop right after the start must not lose its first records.
        self._ready = False
        self._grace_until = time.monotonic() + STARTUP_GRACE

    def __len__(self) -> int:
        return len(self._items)

    # ------------------------------------------------------------------ training thread

    def put(self, item: Any, writer_alive: Callable[[], bool]) -> bool:
        """Queue ``item``; ``False`` (and counted in ``dropped``) if refused.

        A full queue refuses with ``on_full="drop"``; with ``"block"`` it waits for room
        while the writer thread is alive.
        """
        cond = self._cond
        with cond:
            if self._refusing or self.closed:
                self.dropped += 1
                return False
            items = self._items
            if len(items) >= self.max_pending:
                starting = not self._ready and time.monotonic() < self._grace_until
                if self.on_full == "drop" and not starting:
                    self.dropped += 1
                    return False
                while (
                    len(items) >= self.max_pending
                    and not self.closed
                    and not self._refusing
                    and writer_alive()
                    and (self.on_full == "block" or time.monotonic() < self._grace_until)
                ):
                    cond.notify_all()
                    cond.wait(0.1)
                if self._refusing or self.closed or len(items) >= self.max_pending:
                    self.dropped += 1
                    return False
            items.append(item)
            self._enq_seq += 1
            n = len(items)
            if n == 1 or n >= self._high_water:
                cond.notify_all()
        return True

    def ready(self) -> None:
        """The writer thread is ready: from now on "drop" never waits."""
        with self._cond:
            self._ready = True

    def wait_processed(self, timeout: float | None, writer_alive: Callable[[], bool]) -> None:
        """Have every item queued so far written now, and wait until it is processed."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            target = self._enq_seq
            self._flush_target = max(self._flush_target, target)
            self._cond.notify_all()
            while self._done_seq < target and writer_alive():
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    break
                self._cond.wait(remaining if remaining is not None else 0.5)

    def close(self) -> None:
        """Refuse further items; the writer thread drains the queue and stops."""
        with self._cond:
            self.closed = True
            self._cond.notify_all()

    def refuse(self) -> None:
        """Refuse further items (writing is disabled), waking submitters blocked on a full queue."""
        with self._cond:
            self._refusing = True
            self._cond.notify_all()

    # ------------------------------------------------------------------ writer thread

    def lose(self, n: int) -> None:
        """Count ``n`` taken items that could not be written."""
        with self._cond:
            self.dropped += n

    def take(self, next_flush: float) -> Taken:
        """Wait until the queued items are due, then take them all.

        Due: a flush asked for them, the queue is half full, ``time.monotonic()``
        passed ``next_flush``, or the queue is closing.
        """
        cond = self._cond
        with cond:
            while True:
                if self.closed:
                    break
                if self._items and (
                    self._flush_target > self._done_seq
                    or len(self._items) >= self._high_water
                    or time.monotonic() >= next_flush
                ):
                    break
                if not self._items and self._flush_target > self._done_seq:
                    # a flush of items already processed: answer it right away
                    self._done_seq = self._enq_seq
                    cond.notify_all()
                    continue
                cond.wait(max(0.0, next_flush - time.monotonic()) if self._items else None)
            items = list(self._items)
            self._items.clear()  # same deque object: put() may hold a reference
            taken = Taken(items, self._enq_seq, self.closed)
            cond.notify_all()  # wake submitters blocked on a full queue
        return taken

    def processed(self, taken: Taken) -> bool:
        """Mark ``taken`` processed (waking flushes); ``True`` when the writer should stop."""
        with self._cond:
            self._done_seq = max(self._done_seq, taken.seq)
            self._cond.notify_all()
            return taken.closing and not self._items

    def all_processed(self) -> None:
        """The writer thread has stopped: no flush waits for anything any more."""
        with self._cond:
            self._done_seq = self._enq_seq
            self._cond.notify_all()
