"""SegmentFiles: numbering after existing segments, rotation, closing and abandoning."""

from __future__ import annotations

import errno
import os

import pyarrow as pa
import pytest

from torchvitals.store import segments as segments_module
from torchvitals.store.segments import SegmentFiles
from torchvitals.store.table_builder import TableBuilder

EOS = b"\xff\xff\xff\xff\x00\x00\x00\x00"  # Arrow IPC end-of-stream marker


def batch(table="scalars", step=0, n=1):
    b = TableBuilder(table, 0)
    if table == "scalars":
        b.add({"step": step, "name": ["loss"] * n, "value": [1.0] * n})
    else:
        b.add({"step": step, "layer": ["fc"] * n, "kind": "grad", "numel": [1] * n})
    return b.build()


def files(path):
    return sorted(f for f in os.listdir(path) if f.endswith(".arrows"))


def rows(path):
    with pa.ipc.open_stream(path) as reader:
        return reader.read_all().num_rows


def test_numbering_continues_after_existing_segments(tmp_path):
    for name in [
        "scalars.rank0.000001.arrows",
        "scalars.rank0.000003.arrows",
        "scalars.rank1.000009.arrows",  # another rank's
        "nope.rank0.000009.arrows",  # not a table
        "layers.rank0.000008.arrows.tmp",  # not a segment
    ]:
        (tmp_path / name).write_bytes(b"old")
    segs = SegmentFiles(str(tmp_path), 0, 1 << 20, compact=False)
    segs.number_after_existing()
    assert segs.path_for("scalars") == str(tmp_path / "scalars.rank0.000004.arrows")
    assert segs.path_for("layers") == str(tmp_path / "layers.rank0.000000.arrows")
    segs.write("scalars", batch())
    segs.close_all(on_error=pytest.fail)
    assert "scalars.rank0.000004.arrows" in files(tmp_path)
    assert (tmp_path / "scalars.rank0.000003.arrows").read_bytes() == b"old"  # never overwritten


def test_a_new_directory_starts_at_zero(tmp_path):
    segs = SegmentFiles(str(tmp_path), 2, 1 << 20, compact=False)
    segs.number_after_existing()
    segs.write("layers", batch("layers"))
    assert segs.path_for("layers") == str(tmp_path / "layers.rank2.000000.arrows")
    segs.close_all(on_error=pytest.fail)


def test_rotation_once_a_segment_reaches_segment_bytes(tmp_path):
    probe = SegmentFiles(str(tmp_path), 0, 1 << 20, compact=False)
    for step in range(2):
        probe.write("scalars", batch(step=step))
    probe.flush(["scalars"], on_error=pytest.fail)
    two = os.path.getsize(probe.path_for("scalars"))  # schema + two batches
    probe.close_all(on_error=pytest.fail)

    segs = SegmentFiles(str(tmp_path / "rot"), 0, segment_bytes=two, compact=False)
    os.mkdir(segs.path)
    for step in range(5):
        segs.write("scalars", batch(step=step))
        segs.flush(["scalars"], on_error=pytest.fail)
    segs.close_all(on_error=pytest.fail)
    names = files(segs.path)
    # full after every second batch: segments of 2, 2 and 1 batches
    assert names == [f"scalars.rank0.{i:06d}.arrows" for i in range(3)]
    assert [rows(os.path.join(segs.path, n)) for n in names] == [2, 2, 1]
    assert segs.rows_written["scalars"] == 5


def test_flush_only_rotates_the_tables_named(tmp_path):
    # any flushed segment is full
    segs = SegmentFiles(str(tmp_path), 0, segment_bytes=1, compact=False)
    segs.write("scalars", batch())
    segs.write("layers", batch("layers"))
    segs.flush(["scalars"], on_error=pytest.fail)
    assert segs.path_for("scalars").endswith("scalars.rank0.000001.arrows")  # rotated
    assert segs.path_for("layers").endswith("layers.rank0.000000.arrows")  # still open
    segs.close_all(on_error=pytest.fail)


def test_close_all_ends_every_stream(tmp_path):
    segs = SegmentFiles(str(tmp_path), 0, 1 << 20, compact=False)
    segs.write("scalars", batch(n=3))
    segs.write("layers", batch("layers", n=2))
    segs.close_all(on_error=pytest.fail)
    for name, n in zip(files(tmp_path), [2, 3], strict=True):  # layers, scalars
        data = (tmp_path / name).read_bytes()
        assert data.endswith(EOS) and rows(str(tmp_path / name)) == n
    assert segs.rows_written == {"scalars": 3, "layers": 2, "hist": 0}


def test_abandon_closes_the_files_without_an_end_marker(tmp_path):
    segs = SegmentFiles(str(tmp_path), 0, 1 << 20, compact=False)
    segs.write("scalars", batch(n=2))
    segs.abandon()
    (name,) = files(tmp_path)
    data = (tmp_path / name).read_bytes()
    assert not data.endswith(EOS) and rows(str(tmp_path / name)) == 2  # flushed by close
    segs.close_all(on_error=pytest.fail)  # nothing left open


@pytest.mark.parametrize("abandon_on_error", [False, True])
def test_close_all_reports_each_failure(tmp_path, monkeypatch, abandon_on_error):
    original = segments_module._Segment.close

    def close(self):
        if "scalars" in self.path:
            self.release()
            raise OSError(errno.ENOSPC, "No space left on device")
        original(self)

    monkeypatch.setattr(segments_module._Segment, "close", close)
    segs = SegmentFiles(str(tmp_path), 0, 1 << 20, compact=False)
    for table in ("scalars", "layers", "hist"):
        segs.write(table, batch(table) if table != "hist" else _hist_batch())
    errors = []

    def on_error(exc, path):
        errors.append((exc.errno, os.path.basename(path)))
        if abandon_on_error:  # what the writer does on its first I/O error
            segs.abandon()

    segs.close_all(on_error)
    assert errors == [(errno.ENOSPC, "scalars.rank0.000000.arrows")]
    ends = {n.split(".")[0]: (tmp_path / n).read_bytes().endswith(EOS) for n in files(tmp_path)}
    assert ends == {"scalars": False, "layers": not abandon_on_error, "hist": not abandon_on_error}


def test_a_failed_write_is_taken_back_and_the_next_segment_opened(tmp_path, monkeypatch):
    """A full disk in the middle of a batch: the file ends at its last complete batch, no
    batch is half written, and writing goes on in the next segment."""
    segs = SegmentFiles(str(tmp_path), 0, 1 << 20, compact=False)
    segs.write("scalars", batch(step=0, n=2))
    size = os.path.getsize(tmp_path / "scalars.rank0.000000.arrows")
    real_write = os.write

    def half_then_enospc(fd, data):
        if len(data) > 64:
            real_write(fd, bytes(data[:64]))  # a partial write, then the disk is full
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, data)

    monkeypatch.setattr(segments_module.os, "write", half_then_enospc, raising=True)
    monkeypatch.setattr("torchvitals.store.layout.os.write", half_then_enospc)
    with pytest.raises(OSError, match="No space left"):
        segs.write("scalars", batch(step=1, n=3))
    monkeypatch.undo()
    assert os.path.getsize(tmp_path / "scalars.rank0.000000.arrows") == size  # taken back
    assert rows(str(tmp_path / "scalars.rank0.000000.arrows")) == 2
    segs.write("scalars", batch(step=2, n=4))  # space is back: the next segment
    segs.close_all(on_error=pytest.fail)
    assert files(tmp_path) == ["scalars.rank0.000000.arrows", "scalars.rank0.000001.arrows"]
    assert rows(str(tmp_path / "scalars.rank0.000001.arrows")) == 4
    assert segs.rows_written["scalars"] == 6


def _hist_batch():
    b = TableBuilder("hist", 0)
    b.add({"step": 0, "layer": "fc", "kind": "grad", "counts": [[1, 2]]})
    return b.build()
