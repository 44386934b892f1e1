"""The writer's start and a fork: a fast loop right after the start loses nothing while
the writer thread gets ready, and a forked child never writes (nor closes) the parent's
run."""

from __future__ import annotations

import os
import threading
import warnings

import pytest

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


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_child_never_writes_or_closes_the_parents_run(tmp_path):
    w = RunWriter(tmp_path / "run", manifest=MANIFEST)
    w.submit("scalars", {"step": 0, "name": "loss", "value": 1.0})
    w.flush()
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: submit, close, and exit normally (atexit runs)
        os.close(read)
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                accepted = w.submit("scalars", {"step": 1, "name": "loss", "value": 2.0})
                w.close()
            said = any("is a fork of" in str(c.message) for c in caught)
            os.write(write, b"ok" if not accepted and said else b"bad")
        finally:
            os._exit(0)
    os.close(write)
    _, status = os.waitpid(pid, 0)
    assert os.read(read, 8) == b"ok" and status == 0
    os.close(read)
    w.submit("scalars", {"step": 2, "name": "loss", "value": 3.0})
    w.close()
    run = load_run(tmp_path / "run")
    assert run.scalar("loss")[0].tolist() == [0, 2]
    assert run.manifest["rows_written"]["scalars"] == 2 and run.closed
