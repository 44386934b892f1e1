"""SubmitQueue: bounded hand-over from the training thread to the writer thread.

Waits are on threads and conditions; a join's timeout only guards against a hang.
"""

from __future__ import annotations

import threading
import time

from torchvitals.store.submit_queue import SubmitQueue


def alive():
    return True


def later():
    return time.monotonic() + 3600  # a flush interval that never runs out during a test


def in_thread(fn, *args):
    result = []
    t = threading.Thread(target=lambda: result.append(fn(*args)))
    t.start()
    return t, result


def test_drop_mode_refuses_a_full_queue_and_counts_it():
    q = SubmitQueue(2, "drop")
    assert [q.put(i, alive) for i in range(4)] == [True, True, False, False]
    assert len(q) == 2 and q.dropped == 2


def test_block_mode_waits_for_room():
    q = SubmitQueue(1, "block")
    assert q.put("a", alive)
    t, result = in_thread(q.put, "b", alive)
    assert t.is_alive()  # cannot return while the queue is full and the writer alive
    assert q.take(0.0).items == ["a"]
    t.join(60)
    assert not t.is_alive() and result == [True] and len(q) == 1 and q.dropped == 0


def test_block_mode_gives_up_when_the_writer_is_gone():
    q = SubmitQueue(1, "block")
    q.put("a", alive)
    assert q.put("b", lambda: False) is False and q.dropped == 1


def test_refuse_wakes_a_blocked_submitter():
    q = SubmitQueue(1, "block")
    q.put("a", alive)
    t, result = in_thread(q.put, "b", alive)
    q.refuse()
    t.join(60)
    assert not t.is_alive() and result == [False] and q.dropped == 1
    assert q.put("c", alive) is False and q.dropped == 2


def test_a_flush_makes_items_due_and_waits_until_they_are_processed():
    q = SubmitQueue(8, "drop")
    for i in range(3):
        q.put(i, alive)
    flush, _ = in_thread(q.wait_processed, None, alive)
    taken = q.take(later())  # due because of the flush, not the interval
    assert taken.items == [0, 1, 2] and taken.seq == 3 and not taken.closing
    assert flush.is_alive()  # cannot return before the items are processed
    assert q.processed(taken) is False  # not closing: keep going
    flush.join(60)
    assert not flush.is_alive()


def test_half_full_queue_is_due_at_once():
    q = SubmitQueue(4, "drop")
    q.put("a", alive)
    q.put("b", alive)
    assert q.take(later()).items == ["a", "b"]


def test_close_refuses_new_items_and_the_last_take_stops_the_writer():
    q = SubmitQueue(8, "drop")
    q.put("a", alive)
    q.close()
    assert q.closed and q.put("b", alive) is False and q.dropped == 1
    taken = q.take(later())  # closing: due at once
    assert taken.items == ["a"] and taken.closing
    assert q.processed(taken) is True


def test_lose_counts_items_taken_but_not_written():
    q = SubmitQueue(8, "drop")
    q.lose(5)
    assert q.dropped == 5


def test_flush_with_nothing_queued_returns_at_once():
    q = SubmitQueue(8, "drop")
    q.wait_processed(None, alive)
    q.all_processed()
    q.wait_processed(None, lambda: False)
