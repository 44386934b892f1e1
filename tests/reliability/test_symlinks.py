"""Symbolic links planted where torchvitals writes (segments, the manifest and its
temporary file, the writer lock, the report) are never written through: the target is
untouched, the error names the file and says "symbolic link", and the rows go to the
next segment or are counted."""

from __future__ import annotations

import json
import os
import warnings

import pyarrow as pa
import pytest
from writer_loops import torchvitals_warnings, train

from torchvitals.store.manifest import ManifestFile
from torchvitals.store.reader import load_run
from torchvitals.store.segments import SegmentFiles
from torchvitals.store.table_builder import TableBuilder
from torchvitals.store.writer import RunWriter

MANIFEST = {"world_size": 1}


def submit_steps(w, steps):
    for step in steps:
        w.submit("scalars", {"step": step, "name": "loss", "value": float(step)})
    w.flush()


def batch(n=1):
    b = TableBuilder("scalars", 0)
    b.add({"step": 0, "name": ["loss"] * n, "value": [1.0] * n})
    return b.build()


def rows(path):
    with pa.ipc.open_stream(path) as reader:
        return reader.read_all().num_rows


def test_a_link_in_the_way_is_never_written_through(tmp_path):
    target = tmp_path / "target"
    target.write_bytes(b"precious")
    (tmp_path / "scalars.rank0.000000.arrows").symlink_to(target)
    taken = []
    segs = SegmentFiles(
        str(tmp_path), 0, 1 << 20, on_taken=lambda e, p: taken.append((e, p)), compact=False
    )
    segs.write("scalars", batch(n=2))
    segs.close_all(on_error=pytest.fail)
    assert target.read_bytes() == b"precious"
    ((exc, path),) = taken
    assert path.endswith("scalars.rank0.000000.arrows") and "symbolic link" in str(exc)
    assert rows(str(tmp_path / "scalars.rank0.000001.arrows")) == 2


def test_manifest_never_written_through_a_link(tmp_path):
    target = tmp_path / "elsewhere.json"
    target.write_text("precious")
    (tmp_path / "manifest.rank0.json").symlink_to(target)
    m = ManifestFile(str(tmp_path), 0, {}, settings={})
    try:
        m.write_start()
    except OSError as exc:
        assert "symbolic link" in str(exc) and "manifest.rank0.json" in str(exc)
    else:
        raise AssertionError("wrote through a symbolic link")
    assert target.read_text() == "precious"
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith("writer.")) == [
        "elsewhere.json",
        "manifest.rank0.json",
    ]  # no temporary file left behind


def test_planted_link_is_not_written_through(tmp_path):
    path = str(tmp_path / "run")
    target = tmp_path / "victim"
    target.write_bytes(b"precious")
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        w = RunWriter(path, manifest=MANIFEST, flush_interval=0.01)
        os.symlink(target, os.path.join(path, "scalars.rank0.000000.arrows"))
        train(w, 10)
        w.close()
    assert target.read_bytes() == b"precious"
    msgs = torchvitals_warnings(rec)
    assert len(msgs) == 1 and "scalars.rank0.000000.arrows" in msgs[0]
    assert "symbolic link" in msgs[0]
    assert w.write_errors == 1 and w.dropped == 0
    assert load_run(path).scalar("loss")[0].tolist() == list(range(10))  # in segment 1


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
