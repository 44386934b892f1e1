"""The writer under hostile conditions: its directory deleted, moved or replaced, a
second writer on the same directory (the writer lock). Nothing is lost silently: every row is
on disk or counted (dropped, rows_lost), and the manifest says what is on disk."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
from harness import _env

from torchvitals.store import segments
from torchvitals.store.reader import load_run
from torchvitals.store.rundir import RunDirectoryInUse
from torchvitals.store.writer import RunWriter

CHILD = Path(__file__).resolve().parent / "writer_child.py"
MANIFEST = {"world_size": 1}


def submit_steps(w, steps):
    for step in steps:
        w.submit("scalars", {"step": step, "name": "loss", "value": float(step)})
    w.flush()


def torchvitals_warnings(rec):
    return [str(r.message) for r in rec if "torchvitals" in str(r.message)]


def on_disk_steps(path):
    run = load_run(path)
    return set(run.scalar("loss")[0].tolist()), run


@pytest.mark.parametrize("how", ["deleted", "deleted and re-created", "moved away", "replaced"])
def test_directory_vanishing_mid_run_is_noticed_and_counted(tmp_path, how):
    path = str(tmp_path / "run")
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        w = RunWriter(path, manifest=MANIFEST, flush_interval=60)
        submit_steps(w, range(0, 50))
        if how.startswith("deleted"):
            shutil.rmtree(path)
            if how.endswith("re-created"):
                os.mkdir(path)
        elif how == "moved away":
            os.rename(path, path + ".old")
        else:
            os.rename(path, path + ".old")
            os.mkdir(path)
        submit_steps(w, range(50, 60))  # written to the old directory: lost, and counted
        submit_steps(w, range(60, 100))  # the new directory
        w.close()
    msgs = torchvitals_warnings(rec)
    assert len(msgs) == 1 and path in msgs[0], msgs
    assert how.split(" and")[0].split(" by")[0] in msgs[0]
    steps, run = on_disk_steps(path)
    m = run.manifest
    assert steps == set(range(60, 100))
    assert m["rows_written"]["scalars"] == 40 == run.scalars.num_rows  # what is on disk
    assert m["rows_lost"] == {"scalars": 60} and m["run_dir_lost"] == 1
    assert run.problems == [] and "closed_at" in m
    if how == "moved away" or how == "replaced":
        old_steps, _ = on_disk_steps(path + ".old")  # the rows counted lost are there
        assert old_steps == set(range(60))


@pytest.mark.parametrize("form", ["stream", "compacted"])
def test_segment_file_deleted_mid_run_is_counted(tmp_path, monkeypatch, form):
    """A closed segment deleted mid-run: as its stream (compaction off), or as the Parquet
    file its compaction made (waited for, so that the deletion does not race it)."""
    if form == "stream":
        monkeypatch.setattr(segments, "COMPACT", False)
    path = str(tmp_path / "run")
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        w = RunWriter(path, manifest=MANIFEST, flush_interval=60, segment_bytes=1)
        submit_steps(w, range(10))  # one segment per flush
        submit_steps(w, range(10, 20))
        victim = os.path.join(
            path, f"scalars.rank0.000000.{'arrows' if form == 'stream' else 'parquet'}"
        )
        deadline = time.monotonic() + 60  # guards against a hang only
        while not os.path.exists(victim):
            assert time.monotonic() < deadline, f"{victim} never appeared"
            time.sleep(0.01)
        os.unlink(victim)
        submit_steps(w, range(20, 30))
        w.close()
    msgs = torchvitals_warnings(rec)
    assert len(msgs) == 1 and "10 scalars row(s) lost" in msgs[0], msgs
    steps, run = on_disk_steps(path)
    assert steps == set(range(10, 30))
    assert run.manifest["rows_written"]["scalars"] == 20
    assert run.manifest["rows_lost"] == {"scalars": 10}


def test_second_writer_in_process_is_moved_aside(tmp_path):
    path = str(tmp_path / "run")
    first = RunWriter(path, manifest=MANIFEST)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        second = RunWriter(path, manifest=MANIFEST)
    (msg,) = torchvitals_warnings(rec)
    assert f"{path} is in use" in msg and f"pid {os.getpid()}" in msg and f"{path}.1" in msg
    assert second.path == path + ".1"
    with pytest.raises(RunDirectoryInUse, match="is in use"):
        RunWriter(path, manifest=MANIFEST, strict=True)
    submit_steps(first, range(0, 10))
    submit_steps(second, range(100, 110))
    first.close()
    second.close()
    assert on_disk_steps(path)[0] == set(range(10))
    assert on_disk_steps(path + ".1")[0] == set(range(100, 110))
    assert not [n for n in os.listdir(path) if n.endswith(".lock")]  # released at close
    third = RunWriter(path, manifest=MANIFEST)  # free again: same directory, continued
    submit_steps(third, range(10, 12))
    third.close()
    assert on_disk_steps(path)[0] == set(range(12))


def test_second_writer_across_processes_and_a_killed_holder(tmp_path):
    path = str(tmp_path / "run")
    child = subprocess.Popen(
        [sys.executable, str(CHILD), path], stdout=subprocess.PIPE, text=True, env=_env()
    )
    try:
        assert child.stdout.readline().startswith("ready")
        with warnings.catch_warnings(record=True) as rec:
            warnings.simplefilter("always")
            w = RunWriter(path, manifest=MANIFEST)
        assert w.path == path + ".1"
        assert f"pid {child.pid}" in torchvitals_warnings(rec)[0]
        w.close()
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(30)
    # the kernel released the dead writer's lock: a restarted job takes the directory
    w = RunWriter(path, manifest=MANIFEST)
    assert w.path == path
    submit_steps(w, [10**6])
    w.close()
    steps, _ = on_disk_steps(path)
    assert 0 in steps and 10**6 in steps
