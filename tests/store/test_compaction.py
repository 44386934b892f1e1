"""Compaction of closed segments into Parquet files: same rows, atomic, never counted twice."""

from __future__ import annotations

import os
import shutil
import warnings

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from torchvitals.store import compaction, segments
from torchvitals.store.layout import parse_segment_file, segment_name
from torchvitals.store.reader import list_run_files, load_run, read_segment_file
from torchvitals.store.segments import SegmentFiles
from torchvitals.store.table_builder import TableBuilder
from torchvitals.store.writer import RunWriter


def random_batches(rng, steps, per_step=3):
    """layers batches of random rows, several steps each, steps out of order within a batch."""
    out = []
    for start in range(0, steps, 4):
        b = TableBuilder("layers", 0)
        for step in rng.permutation(np.arange(start, min(start + 4, steps))):
            b.add(
                {
                    "step": int(step),
                    "layer": [f"l{i}" for i in range(per_step)],
                    "kind": "grad",
                    "numel": rng.integers(1, 100, per_step),
                    "sumsq": rng.random(per_step),
                    "max_abs": rng.random(per_step),
                }
            )
        out.append(b.build())
    return out


def write_segments(path, batches, compact):
    segs = SegmentFiles(str(path), 0, 1 << 30, compact=compact)
    for batch in batches:
        segs.write("layers", batch)
    segs.close_all(on_error=pytest.fail)
    return segs


def test_compacted_segment_holds_the_same_rows(tmp_path):
    rng = np.random.default_rng(11)
    batches = random_batches(rng, 40)
    write_segments(tmp_path / "s", batches, compact=False)
    segs = write_segments(tmp_path / "p", batches, compact=True)
    assert [n for n in os.listdir(tmp_path / "p") if "layers" in n] == [
        "layers.rank0.000000.parquet"
    ]
    stream, rec = read_segment_file(tmp_path / "s" / "layers.rank0.000000.arrows")
    assert rec is None
    parquet, rec = read_segment_file(tmp_path / "p" / "layers.rank0.000000.parquet")
    assert rec is None and parquet.schema.equals(stream.schema, check_metadata=False)
    # sorted by step, stably: a stable sort of the stream's rows
    order = np.argsort(stream["step"].to_numpy(), kind="stable")
    assert parquet.equals(stream.take(order))
    # the writer's bookkeeping follows the file to its new name
    (entry,) = segs._done
    assert entry[1] == "layers.rank0.000000.parquet"
    meta = pq.read_metadata(tmp_path / "p" / "layers.rank0.000000.parquet").metadata
    assert int(meta[compaction.ROWS_KEY]) == stream.num_rows
    assert len(compaction.source_checksums(meta)) == len(batches)


def compact_layers(path, row_group_bytes=None):
    st = os.stat(path / "layers.rank0.000000.arrows")
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        name, _identity = compaction.compact(
            fd, "layers.rank0.000000.arrows", (st.st_dev, st.st_ino), row_group_bytes
        )
    finally:
        os.close(fd)
    return path / name


def test_row_groups_sorted_by_step_and_read_back_whole(tmp_path):
    rng = np.random.default_rng(5)
    batches = random_batches(rng, 200, per_step=50)
    write_segments(tmp_path, batches, compact=False)
    path = compact_layers(tmp_path, row_group_bytes=50_000)
    pf = pq.ParquetFile(path)
    assert pf.metadata.num_row_groups > 3
    for i in range(pf.metadata.num_row_groups):
        steps = pf.read_row_group(i, columns=["step"])["step"].to_numpy()
        assert (np.diff(steps) >= 0).all()
        stats = pf.metadata.row_group(i).column(0).statistics
        assert stats.has_min_max and stats.min == steps.min() and stats.max == steps.max()
    # the rows of a step in the order written
    table, rec = read_segment_file(path)
    stream = pa.Table.from_batches(batches)
    assert rec is None and table.equals(stream.take(np.argsort(stream["step"], kind="stable")))


def test_histograms_and_floats_are_byte_stream_split(tmp_path):
    """PARQUET_OPTIONS names the leaves it encodes; pyarrow ignores any other name silently."""
    with RunWriter(tmp_path, manifest={"world_size": 1}, on_full="block") as w:
        w.submit("layers", {"step": 0, "layer": ["a"], "kind": "grad", "sum": [1.0]})
        counts = [[0, 3, 2**40], [1, 0, 0]]
        w.submit("hist", {"step": 0, "layer": ["a", "b"], "kind": "grad", "counts": counts})
    for table, columns in (("hist", ["counts", "neg_counts"]), ("layers", ["sum", "max_abs"])):
        meta = pq.read_metadata(tmp_path / f"{table}.rank0.000000.parquet")
        group = meta.row_group(0)
        encodings = {
            group.column(i).path_in_schema: group.column(i).encodings
            for i in range(group.num_columns)
        }
        for name in columns:
            leaf = next(k for k in encodings if k.split(".")[0] == name)
            assert "BYTE_STREAM_SPLIT" in encodings[leaf], (leaf, encodings[leaf])
    hist = load_run(tmp_path).hist
    assert hist["counts"].to_pylist() == counts


def write_run(path, steps=30):
    with RunWriter(path, manifest={"world_size": 1}, on_full="block") as w:
        for step in range(steps):
            w.submit("scalars", {"step": step, "name": ["loss"], "value": [1.0 / (step + 1)]})
            w.submit(
                "layers",
                {"step": step, "layer": ["a", "b"], "kind": "grad", "sumsq": [1.0, step]},
            )
            w.flush()


def quiet_load(path):
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        run = load_run(path)
    return run, [str(r.message) for r in rec if "torchvitals" in str(r.message)]


def test_both_formats_of_a_segment_are_read_once(tmp_path, monkeypatch):
    """A crash between the link and the removal of the stream leaves both: one is read."""
    monkeypatch.setattr(segments, "COMPACT", False)
    write_run(tmp_path / "s")
    monkeypatch.setattr(segments, "COMPACT", True)
    write_run(tmp_path / "p")
    both = tmp_path / "both"
    shutil.copytree(tmp_path / "p", both)
    for name in os.listdir(tmp_path / "s"):
        if name.endswith(".arrows"):
            shutil.copy(tmp_path / "s" / name, both / name)
    reference, msgs = quiet_load(tmp_path / "p")
    assert msgs == []
    run, msgs = quiet_load(both)
    assert msgs == [] and run.recovery == []
    assert run.layers.equals(reference.layers) and run.scalars.equals(reference.scalars)
    listed = [(f.table, f.format) for f in list_run_files(both) if f.kind == "segment"]
    assert ("layers", "arrows") in listed and ("layers", "parquet") in listed

    # the Parquet file damaged: the intact stream is read instead, still once
    victim = both / "layers.rank0.000000.parquet"
    data = bytearray(victim.read_bytes())
    data[len(data) // 3] ^= 0xFF
    victim.write_bytes(bytes(data))
    run, msgs = quiet_load(both)
    assert run.layers.equals(reference.layers)
    assert msgs == [] and run.recovery == []


def test_a_failed_compaction_leaves_the_stream(tmp_path, monkeypatch):
    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(compaction.os, "link", full_disk)
    with pytest.warns(RuntimeWarning, match="could not compact .*No space left on device"):
        write_run(tmp_path)
    names = sorted(os.listdir(tmp_path))
    assert names == [
        "layers.rank0.000000.arrows",
        "manifest.rank0.json",
        "scalars.rank0.000000.arrows",
    ]  # no temporary file left behind
    run, msgs = quiet_load(tmp_path)
    assert msgs == [] and run.layers.num_rows == 60


def test_a_damaged_row_group_is_skipped_and_the_others_kept(tmp_path):
    rng = np.random.default_rng(2)
    write_segments(tmp_path, random_batches(rng, 200, per_step=50), compact=False)
    path = compact_layers(tmp_path, row_group_bytes=100_000)
    whole, _ = read_segment_file(path)
    meta = pq.read_metadata(path)
    group = meta.row_group(1)
    col = group.column(7)  # sumsq
    data = bytearray(path.read_bytes())
    data[col.data_page_offset + col.total_compressed_size - 5] ^= 0x01  # in its last page
    path.write_bytes(bytes(data))
    table, rec = read_segment_file(path)
    assert rec is not None and rec.file == str(path) and len(rec.damage) == 1
    assert rec.damage[0].rows == group.num_rows and "row group 1" in rec.damage[0].error
    assert table.num_rows == whole.num_rows - group.num_rows
    assert rec.batches == meta.num_row_groups - 1


def test_public_file_listing_and_reading(tmp_path):
    write_run(tmp_path)
    files = list_run_files(tmp_path)
    assert [(f.kind, f.table, f.format) for f in files] == [
        ("manifest", None, None),
        ("segment", "layers", "parquet"),
        ("segment", "scalars", "parquet"),
    ]
    (tmp_path / "layers.rank0.0.parquet").write_bytes(b"a copy")  # not exact: not listed
    assert len(list_run_files(tmp_path)) == 3
    table, rec = read_segment_file(files[2].path)
    assert rec is None and table["value"].to_pylist()[:2] == [1.0, 0.5]
    with pytest.raises(ValueError, match=r"layers\.rank0\.0\.parquet"):
        read_segment_file(tmp_path / "layers.rank0.0.parquet")


def test_parquet_names_are_exact():
    assert segment_name("hist", 3, 7, "parquet") == "hist.rank3.000007.parquet"
    assert parse_segment_file("hist.rank3.000007.parquet") == ("hist", 3, 7, "parquet")
    assert parse_segment_file("hist.rank3.000007.arrows") == ("hist", 3, 7, "arrows")
    for bad in ("hist.rank03.000007.parquet", "hist.rank3.7.parquet", "hist.rank3.000007.pq"):
        assert parse_segment_file(bad) is None
    with pytest.raises(ValueError, match="segment format"):
        segment_name("hist", 0, 0, "feather")


def test_a_parquet_file_of_another_table_is_refused(tmp_path):
    write_run(tmp_path)
    os.replace(tmp_path / "scalars.rank0.000000.parquet", tmp_path / "layers.rank0.000001.parquet")
    table, rec = read_segment_file(tmp_path / "layers.rank0.000001.parquet")
    assert table.num_rows == 0 and "names table 'scalars', not 'layers'" in rec.error
    assert pa.types.is_dictionary(table.schema.field("layer").type)


def test_compacted_files_read_back_as_written(tmp_path, monkeypatch):
    """A Monitor-like run (a tensor's weights every few steps, a tensor first seen late,
    small row groups) reads back from its Parquet files exactly as from its streams: rows
    by step, those of a step in the order submitted; and a scan gives the same rows."""
    from torchvitals.store.scan import scan_run

    def write(path):
        rng = np.random.default_rng(2)
        with RunWriter(path, manifest={"world_size": 1}, on_full="block") as w:
            for step in range(40):
                names = ["fc1", "fc2", *(["late"] if step >= 17 else []), "fc2", "fc1"]
                kinds = ["act", "act", *(["act"] if step >= 17 else []), "grad", "grad"]
                if step % 5 == 0:
                    names, kinds = [*names, "fc1", "fc2"], [*kinds, "weight", "weight"]
                n = len(names)
                w.submit("scalars", {"step": step, "name": ["loss"], "value": [rng.random()]})
                w.submit("layers", {"step": step, "layer": names, "kind": kinds,
                                    "numel": np.full(n, 64), "sumsq": rng.random(n)})  # fmt: skip
                counts = rng.integers(0, 1 << 40, (n, 84))
                w.submit("hist", {"step": step, "layer": names, "kind": kinds, "counts": counts,
                                  "neg_counts": counts // 3})  # fmt: skip
                if step % 3 == 0:
                    w.flush()

    monkeypatch.setattr(compaction, "ROW_GROUP_BYTES", 40_000)
    monkeypatch.setattr(segments, "COMPACT", False)
    write(tmp_path / "s")
    monkeypatch.setattr(segments, "COMPACT", True)
    write(tmp_path / "p")
    pf = pq.ParquetFile(tmp_path / "p" / "hist.rank0.000000.parquet")
    assert pf.metadata.num_row_groups > 2
    streams, parquet = load_run(tmp_path / "s"), load_run(tmp_path / "p")
    for table in ("scalars", "layers", "hist"):
        want = streams.table(table).drop_columns(["attempt"])
        assert parquet.table(table).drop_columns(["attempt"]).equals(want), table
        chunks = list(scan_run(tmp_path / "p").chunks(table))
        assert pa.concat_tables(chunks).drop_columns(["attempt"]).equals(want), table
