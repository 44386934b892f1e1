"""load_run: errors, recovery of damaged segments, old schemas, and the docs' snippets."""

from __future__ import annotations

import json
import os
import re
import warnings
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from torchvitals.store import segments
from torchvitals.store.reader import SchemaVersionError, load_run
from torchvitals.store.schema import SCHEMA_VERSION, SCHEMAS
from torchvitals.store.writer import RunWriter

DOCS = str(Path(__file__).resolve().parents[2] / "docs" / "schema.md")


def write_run(path, steps=6, flush_each_step=True):
    """One record batch per step and table (a flush after every step); returns segment sizes."""
    sizes = []
    with RunWriter(path, manifest={"world_size": 1}) as w:
        for step in range(steps):
            w.submit(
                "scalars",
                {"step": step, "name": ["loss", "lr/group0"], "value": [1.0 / (step + 1), 0.1]},
            )
            w.submit(
                "layers",
                {
                    "step": step,
                    "layer": ["fc1", "fc2"],
                    "kind": "grad",
                    "numel": [10, 20],
                    "sumsq": np.array([4.0, 9.0]) * (step + 1),
                },
            )
            w.submit(
                "hist",
                {
                    "step": step,
                    "layer": ["fc1", "fc2"],
                    "kind": "grad",
                    "counts": np.eye(2, 4, dtype=np.int64),
                },
            )
            if flush_each_step:
                w.flush()
                sizes.append(os.path.getsize(os.path.join(path, "scalars.rank0.000000.arrows")))
    return sizes


def load_quiet(path):
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        run = load_run(path)
    return run, [str(r.message) for r in rec if "torchvitals" in str(r.message)]


@pytest.fixture
def streams(monkeypatch):
    """Closed segments stay Arrow streams (not compacted): for the stream reader's tests."""
    monkeypatch.setattr(segments, "COMPACT", False)


@pytest.fixture
def run_dir(tmp_path):
    path = str(tmp_path / "run")
    write_run(path)
    return path


def test_docs_snippets_run(run_dir):
    """Every ```python block of docs/schema.md runs against a real run."""
    text = Path(DOCS).read_text(encoding="utf-8")
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert len(blocks) >= 5
    ns = {"run_dir": run_dir}
    for block in blocks:
        exec(compile(block, DOCS, "exec"), ns)
    assert ns["late"].num_rows == 6 and min(ns["late"]["step"].to_pylist()) == 3  # dataset
    assert ns["grad_norm"].height == 12  # polars
    assert ns["peaks"] == [("loss", 1.0), ("lr/group0", 0.1)]  # duckdb
    assert ns["loss"].index.tolist() == list(range(6))  # pandas
    assert ns["open_scalars"] is None  # a closed run: every segment compacted
    assert ns["steps"].tolist() == list(range(6))


def test_missing_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"run directory not found: .*nope"):
        load_run(tmp_path / "nope")
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(NotADirectoryError, match="file"):
        load_run(f)


def test_no_manifest(tmp_path):
    (tmp_path / "scalars.rank0.000000.arrows").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match=r"no manifest\.rank\*\.json"):
        load_run(tmp_path)


@pytest.mark.parametrize(
    "content, match",
    [
        ("{not json", "not JSON"),
        ("[1, 2]", "expected a JSON object"),
        ('{"rank": 0}', "schema_version missing"),
        (b"\xff\xfe\x00garbage", "not JSON"),
    ],
)
def test_bad_manifest(run_dir, content, match):
    p = os.path.join(run_dir, "manifest.rank0.json")
    with open(p, "wb") as f:
        f.write(content.encode() if isinstance(content, str) else content)
    with pytest.raises(ValueError, match=match) as ei:
        load_run(run_dir)
    assert p in str(ei.value)


def test_newer_schema_version_in_manifest(run_dir):
    p = os.path.join(run_dir, "manifest.rank0.json")
    m = json.loads(Path(p).read_text())
    m["schema_version"] = SCHEMA_VERSION + 1
    Path(p).write_text(json.dumps(m))
    with pytest.raises(SchemaVersionError) as ei:
        load_run(run_dir)
    msg = str(ei.value)
    assert p in msg and f"version {SCHEMA_VERSION + 1}" in msg and f"({SCHEMA_VERSION})" in msg
    assert isinstance(ei.value, ValueError)


def test_newer_schema_version_in_segment(run_dir):
    path = os.path.join(run_dir, "scalars.rank0.000001.arrows")
    schema = SCHEMAS["scalars"].with_metadata(
        {b"torchvitals.schema_version": str(SCHEMA_VERSION + 1).encode()}
    )
    with pa.ipc.new_stream(path, schema) as w:
        w.write_table(schema.empty_table())
    with pytest.raises(SchemaVersionError, match=re.escape(path)):
        load_run(run_dir)


def test_truncated_segment_mid_batch(tmp_path, streams):
    path = str(tmp_path / "run")
    sizes = write_run(path)  # sizes[k]: file size after k+1 batches
    seg = os.path.join(path, "scalars.rank0.000000.arrows")
    data = Path(seg).read_bytes()
    cut = (sizes[3] + sizes[4]) // 2  # inside the 5th batch
    Path(seg).write_bytes(data[:cut])
    run, msgs = load_quiet(path)
    assert len(msgs) == 2
    assert seg in msgs[0] and "recovered 4 complete record batch(es), 8 row(s)" in msgs[0]
    # the closing manifest says how many rows the damage cost
    assert "scalars of rank 0" in msgs[1] and "4 of the 12 row(s)" in msgs[1]
    (rec,) = run.recovery
    assert (rec.file, rec.table, rec.rank, rec.batches, rec.rows) == (seg, "scalars", 0, 4, 8)
    (damage,) = rec.damage
    assert damage.offset == sizes[3] and damage.rows is None and rec.rows_lost is None
    steps, _ = run.scalar("loss")
    assert steps.tolist() == [0, 1, 2, 3]
    assert run.layers.num_rows == 12  # other tables untouched

    # cut exactly at a batch boundary (killed between writes, no end-of-stream marker): the
    # segment itself looks whole; only the closing manifest tells that rows are missing
    Path(seg).write_bytes(data[: sizes[2]])
    run, msgs = load_quiet(path)
    assert run.recovery == [] and run.scalar("loss")[0].tolist() == [0, 1, 2]
    assert len(msgs) == 1 and "6 of the 12 row(s) the manifest says were written" in msgs[0]


def test_garbage_and_empty_segments(run_dir):
    garbage = os.path.join(run_dir, "layers.rank0.000001.arrows")
    Path(garbage).write_bytes(np.random.default_rng(7).bytes(3000))
    empty = os.path.join(run_dir, "hist.rank0.000001.arrows")
    Path(empty).write_bytes(b"")
    Path(run_dir, "notes.txt").write_text("ignored")
    Path(run_dir, "other.rank0.000000.arrows").write_bytes(b"unknown table")
    run, msgs = load_quiet(run_dir)
    assert sorted(r.file for r in run.recovery) == sorted([garbage, empty])
    assert all(r.batches == 0 and r.rows == 0 for r in run.recovery)
    assert len(msgs) == 2 and all("recovered 0 complete record batch" in m for m in msgs)
    assert run.layers.num_rows == 12 and run.hist.num_rows == 12


def test_wrong_columns_segment_is_reported(run_dir):
    path = os.path.join(run_dir, "scalars.rank0.000001.arrows")
    t = pa.table({"step": pa.array([1], pa.int64()), "something": [1.0]})
    with pa.ipc.new_stream(path, t.schema) as w:
        w.write_table(t)
    run, _msgs = load_quiet(run_dir)
    (rec,) = run.recovery
    assert rec.file == path and rec.batches == 0 and "required column 'rank'" in rec.error
    assert run.scalars.num_rows == 12


def test_older_segment_without_a_column_reads_as_null(run_dir):
    """A run written before a column existed: the column comes back as nulls."""
    path = os.path.join(run_dir, "layers.rank0.000001.arrows")
    old = pa.schema([f for f in SCHEMAS["layers"] if f.name != "saturated_units"])
    t = pa.table(
        {
            f.name: pa.array(
                [7]
                if f.name == "step"
                else [0]
                if f.name == "rank"
                else ["x"]
                if "layer" in f.name or f.name == "kind"
                else [1],
                f.type,
            )
            for f in old
        },
        schema=old,
    )
    with pa.ipc.new_stream(path, old) as w:
        w.write_table(t)
    run, msgs = load_quiet(run_dir)
    assert msgs == [f"torchvitals: layers of rank 0 in {run_dir}: 13 row(s) read, more than the "
                    "12 the manifest says were written (files added?)"]  # fmt: skip
    assert run.layers.schema.equals(SCHEMAS["layers"], check_metadata=False)
    last = run.layers.slice(run.layers.num_rows - 1).to_pylist()[0]
    assert last["step"] == 7 and last["saturated_units"] is None and last["numel"] == 1


def test_unclosed_run_and_repr(tmp_path):
    path = str(tmp_path / "run")
    w = RunWriter(path, manifest={})
    w.submit("scalars", {"step": 0, "name": "loss", "value": 1.0})
    w.flush()
    run = load_run(path)  # while the writer is still open: no end-of-stream marker yet
    assert not run.closed and run.recovery == [] and run.scalar("loss")[1].tolist() == [1.0]
    w.close()
    run = load_run(path)
    assert run.closed and "scalars=1" in repr(run) and run.hist.num_rows == 0
    assert run.hist.schema.equals(SCHEMAS["hist"], check_metadata=False)


def test_a_rank_above_the_world_size_loads(tmp_path):
    """Monitor(rank=3) without world_size writes world_size 1: still a run."""
    path = str(tmp_path / "run")
    with RunWriter(path, manifest={"world_size": 1}, rank=3) as w:
        w.submit("scalars", {"step": 0, "name": "loss", "value": 1.0})
    run, _msgs = load_quiet(path)  # ranks 0-2 missing: a MissingRanksWarning, not an error
    assert run.ranks == [3] and run.scalar("loss", rank=3)[1].tolist() == [1.0]


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        ({"world_size": 0}, r"'world_size' must be an integer in \[1, 1048576\]"),
        ({"world_size": True}, "'world_size' must be an integer"),
        ({"rank": 5}, "'rank' is 5 but the file name says rank 0"),
        ({"distributed": [1]}, "'distributed' must be an object"),
        ({"distributed": {"sharded": {"w": {"recorded_by": [2**40]}}}}, "recorded_by holds"),
        ({"rows_written": {"nope": 1}}, "names unknown table"),
    ],
)
def test_manifest_limits_are_named(run_dir, edit, match):
    p = os.path.join(run_dir, "manifest.rank0.json")
    m = json.loads(Path(p).read_text())
    m.update(edit)
    os.unlink(p)
    Path(p).write_text(json.dumps(m))
    with pytest.raises(ValueError, match=match) as ei:
        load_run(run_dir)
    assert p in str(ei.value)


def test_edited_manifest_is_flagged(run_dir):
    p = os.path.join(run_dir, "manifest.rank0.json")
    m = json.loads(Path(p).read_text())
    m["device"] = "cuda:7"
    os.unlink(p)
    Path(p).write_text(json.dumps(m))
    run, msgs = load_quiet(run_dir)
    assert run.manifest["device"] == "cuda:7"
    assert msgs == run.problems and len(msgs) == 1 and "does not match its checksum" in msgs[0]


def test_large_segment_checked_on_threads(tmp_path, monkeypatch, streams):
    """A segment over PARALLEL_BYTES is hashed on the pool: same verdicts as inline."""
    from torchvitals.store import integrity

    path = str(tmp_path / "run")
    rng = np.random.default_rng(3)
    # Uncompressed: the segment must be large, and random counts would barely shrink anyway.
    with RunWriter(path, manifest={"world_size": 1}, flush_interval=3600, compression=None) as w:
        for step in range(4):
            counts = rng.integers(0, 1000, (3000, 120))
            w.submit("hist", {"step": step, "layer": "fc", "kind": "grad", "counts": counts})
            w.flush()
    seg = Path(path, "hist.rank0.000000.arrows")
    data = bytearray(seg.read_bytes())
    assert len(data) > integrity.PARALLEL_BYTES
    data[len(data) // 2] ^= 0x40  # inside the body of the second or third batch
    seg.write_bytes(bytes(data))
    for parallel in (integrity.PARALLEL_BYTES, 1 << 62):
        monkeypatch.setattr(integrity, "PARALLEL_BYTES", parallel)
        run, _msgs = load_quiet(path)
        (rec,) = run.recovery
        assert rec.batches == 3 and [d.rows for d in rec.damage] == [3000]
        assert "checksum mismatch" in rec.damage[0].error
        assert sorted(set(run.hist["step"].to_pylist())) in ([0, 2, 3], [0, 1, 3])
