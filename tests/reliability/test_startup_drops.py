"""No drops at the start: a fast loop right after the writer's start (its thread slowed
down, as under CPU contention) loses nothing while the writer thread gets ready; once it
is ready, "drop" mode drops (and counts) again."""

from __future__ import annotations

import threading

from torchvitals.store import submit_queue
from torchvitals.store import writer as writer_module
from torchvitals.store.reader import load_run
from torchvitals.store.writer import RunWriter

MANIFEST = {"purpose": "test"}


def test_a_fast_loop_at_the_start_loses_nothing_while_the_writer_gets_ready(tmp_path, monkeypatch):
    # The writer thread's first use of pyarrow, made slow: until it is ready a full
    # "drop" queue waits instead of dropping.
    real_warm_up = writer_module.warm_up
    ready = threading.Event()

    def slow_warm_up():
        threading.Event().wait(0.5)
        real_warm_up()
        ready.set()

    monkeypatch.setattr(writer_module, "warm_up", slow_warm_up)
    w = RunWriter(tmp_path / "run", manifest=MANIFEST, max_pending=8, on_full="drop")
    # Twice what the queue holds, submitted while the writer is still getting ready.
    accepted = [
        w.submit("scalars", {"step": step, "name": "loss", "value": 0.0}) for step in range(16)
    ]
    waited = ready.is_set()  # the ninth submit could only be queued after the writer's start
    w.close()
    assert all(accepted) and w.dropped == 0 and waited
    assert load_run(tmp_path / "run").scalar("loss")[0].tolist() == list(range(16))


def test_drop_mode_drops_again_once_the_writer_is_ready(tmp_path, monkeypatch):
    monkeypatch.setattr(submit_queue, "STARTUP_GRACE", 0.0)  # no start-up wait at all
    queue = submit_queue.SubmitQueue(2, "drop")
    assert queue.put(1, lambda: True) and queue.put(2, lambda: True)
    assert not queue.put(3, lambda: True) and queue.dropped == 1
