"""The writer under hostile conditions: its directory deleted, moved or replaced, a
second writer, links planted where it writes. Nothing is lost silently: every row is
on disk or counted (dropped, rows_lost), and the manifest says what is on disk."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
from harness import _env

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


def test_segment_file_deleted_mid_run_is_counted(tmp_path):
    path = str(tmp_path / "run")
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        w = RunWriter(path, manifest=MANIFEST, flush_interval=60, segment_bytes=1)
        submit_steps(w, range(10))  # one segment per flush
        submit_steps(w, range(10, 20))
        os.unlink(os.path.join(path, "scalars.rank0.000000.arrows"))
        submit_steps(w, range(20, 30))
        w.close()
    msgs = torchvitals_warnings(rec)
    assert len(msgs) == 1 and "10 scalars row(s) lost" in msgs[0]
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


def test_links_planted_where_the_writer_writes(tmp_path):
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    path = tmp_path / "run"
    path.mkdir()
    pid = os.getpid()
    (path / f"manifest.rank0.json.tmp{pid}").symlink_to(victim)  # the old temporary name
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        w = RunWriter(str(path), manifest=MANIFEST)
        (path / "hist.rank0.000000.arrows").symlink_to(victim)  # the next segment's name
        submit_steps(w, range(5))
        w.submit("hist", {"step": 0, "layer": "fc", "kind": "grad", "counts": [[1, 2]]})
        w.close()
    assert victim.read_bytes() == b"precious"
    msgs = torchvitals_warnings(rec)
    assert len(msgs) == 1 and "hist.rank0.000000.arrows" in msgs[0] and "symbolic link" in msgs[0]
    with warnings.catch_warnings(record=True):
        run = load_run(path)  # the link is read (its target is not a segment): reported
    assert run.hist.num_rows == 1 and run.manifest["write_errors"] == 1
    assert [r.file for r in run.recovery] == [str(path / "hist.rank0.000000.arrows")]


@pytest.mark.parametrize("name", ["manifest.rank0.json", "writer.rank0.lock"])
def test_link_at_the_manifest_or_lock_is_refused(tmp_path, name):
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    path = tmp_path / "run"
    path.mkdir()
    (path / name).symlink_to(victim)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        w = RunWriter(str(path), manifest=MANIFEST)
        submit_steps(w, range(3))
        w.close()
    assert victim.read_bytes() == b"precious"
    (msg,) = torchvitals_warnings(rec)
    assert name in msg and w.dropped == 3
    with pytest.raises(OSError):
        RunWriter(str(path), manifest=MANIFEST, strict=True)


def test_report_is_never_written_through_a_link(tmp_path):
    from torchvitals.cli import main

    path = tmp_path / "run"
    with RunWriter(str(path), manifest=MANIFEST) as w:
        for step in range(30):
            w.submit("scalars", {"step": step, "name": "loss", "value": 1.0 / (step + 1)})
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    (path / "report.html").symlink_to(victim)
    assert main(["report", str(path)]) == 2  # a clear error, not a traceback
    assert victim.read_text() == "precious"
    (path / "report.html").unlink()
    assert main(["report", str(path)]) == 0
    assert (path / "report.html").is_file() and not (path / "report.html").is_symlink()
    assert json.loads(json.dumps(victim.read_text())) == "precious"
