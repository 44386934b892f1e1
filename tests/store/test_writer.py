"""RunWriter: round trip, raw-file readability, faults, bounded memory."""

from __future__ import annotations

import os
import resource
import threading
import time
import warnings

import duckdb
import numpy as np
import pandas as pd
import polars as pl
import pyarrow as pa
import pytest
import torch
from writer_loops import torchvitals_warnings, train

from torchvitals.store import segments as segments_module
from torchvitals.store.reader import load_run
from torchvitals.store.schema import DROPPED_SCALAR, SCHEMA_VERSION, SCHEMAS
from torchvitals.store.segments import SegmentFiles
from torchvitals.store.writer import RunWriter

MANIFEST = {"world_size": 1, "config": {"every": 1}}


def segments(path, table=None):
    return sorted(
        os.path.join(path, f)
        for f in os.listdir(path)
        if f.endswith(".arrows") and (table is None or f.startswith(table + "."))
    )


def complete_rows(path):
    """Rows in the complete record batches of a stream that may be being written."""
    rows = 0
    try:
        with pa.ipc.open_stream(path) as reader:
            for batch in reader:
                rows += batch.num_rows
    except (pa.ArrowInvalid, OSError):
        pass
    return rows


def write_sample(path, steps=20, **kw):
    """Write ``steps`` steps of every table; return what was submitted, per table."""
    rng = np.random.default_rng(0)
    layers = ["encoder.0", "encoder.1", "head"]
    expect = {"scalars": [], "layers": [], "hist": []}
    with RunWriter(path, manifest=MANIFEST, flush_interval=0.05, **kw) as w:
        for step in range(steps):
            loss = float(rng.normal())
            w.submit("scalars", {"step": step, "name": "loss", "value": loss})
            lr = torch.tensor([1e-3, 2e-3], dtype=torch.float32)
            w.submit(
                "scalars",
                lambda s=step, lr=lr: {"step": s, "name": ["lr/group0", "lr/group1"], "value": lr},
            )
            expect["scalars"] += [
                (step, "loss", loss),
                (step, "lr/group0", 1e-3),
                (step, "lr/group1", 2e-3),
            ]
            numel = rng.integers(1, 1000, size=3)
            sums = rng.normal(size=3)
            w.submit(
                "layers",
                {
                    "step": step,
                    "layer": layers,
                    "kind": "grad",
                    "numel": torch.from_numpy(numel),
                    "nan": [0, 1, 0],
                    "sum": sums,
                    "sumsq": sums**2,
                    "max_abs": np.abs(sums).astype(np.float32),
                },
            )
            expect["layers"] += [
                (step, layers[i], "grad", int(numel[i]), float(sums[i])) for i in range(3)
            ]
            counts = rng.integers(0, 50, size=(3, 8))
            w.submit("hist", {"step": step, "layer": layers, "kind": "act", "counts": counts})
            expect["hist"] += [(step, layers[i], "act", counts[i].tolist()) for i in range(3)]
    return expect


def test_round_trip_load_run(tmp_path):
    path = str(tmp_path / "run")
    expect = write_sample(path)
    run = load_run(path)
    assert run.ranks == [0] and run.closed and run.recovery == []
    assert run.manifest["schema_version"] == SCHEMA_VERSION
    assert run.manifest["config"] == {"every": 1}
    assert run.manifest["dropped_batches"] == 0 and run.manifest["write_errors"] == 0
    assert run.manifest["rows_written"] == {t: len(v) for t, v in expect.items()}

    s = run.scalars
    assert s.schema.equals(SCHEMAS["scalars"], check_metadata=False)
    got = list(
        zip(s["step"].to_pylist(), s["name"].to_pylist(), s["value"].to_pylist(), strict=True)
    )
    assert len(got) == len(expect["scalars"])
    for (gs, gn, gv), (es, en, ev) in zip(got, expect["scalars"], strict=True):
        assert (gs, gn) == (es, en) and gv == pytest.approx(ev, rel=1e-6)
    assert set(s["rank"].to_pylist()) == {0}

    L = run.layers
    got = list(
        zip(*(L[c].to_pylist() for c in ("step", "layer", "kind", "numel", "sum")), strict=True)
    )
    assert got == expect["layers"]
    assert L["nan"].to_pylist()[:3] == [0, 1, 0]
    assert L["zeros"].null_count == L.num_rows  # omitted column -> null
    np.testing.assert_allclose(
        L["sumsq"].to_numpy(), np.array([e[4] for e in expect["layers"]]) ** 2
    )

    H = run.hist
    assert (
        list(zip(*(H[c].to_pylist() for c in ("step", "layer", "kind", "counts")), strict=True))
        == expect["hist"]
    )

    steps, values = run.scalar("lr/group1")
    assert steps.tolist() == list(range(20)) and np.allclose(values, 2e-3)
    assert run.scalar_names() == ["loss", "lr/group0", "lr/group1"]
    with pytest.raises(KeyError, match="no scalar 'nope'"):
        run.scalar("nope")

    df = run.to_polars("layers")
    assert df.shape == (60, len(SCHEMAS["layers"])) and df["layer"].dtype == pl.Categorical
    pdf = run.to_pandas("hist")
    assert len(pdf) == 60 and list(pdf["counts"].iloc[0]) == expect["hist"][0][3]


def test_raw_segments_read_by_each_library(tmp_path, monkeypatch):
    """A segment being written (closed ones are compacted into Parquet files, left out
    here) is a plain Arrow IPC stream; pyarrow, polars, pandas, duckdb read it."""
    monkeypatch.setattr(segments_module, "COMPACT", False)
    path = str(tmp_path / "run")
    expect = write_sample(path, steps=5)
    for table in ("scalars", "layers", "hist"):
        (seg,) = segments(path, table)
        n = len(expect[table])
        with pa.ipc.open_stream(seg) as reader:  # pyarrow
            t = reader.read_all()
        assert t.num_rows == n and t.schema.metadata[b"torchvitals.table"] == table.encode()
        assert pl.read_ipc_stream(seg).height == n  # polars, native reader
        with pa.ipc.open_stream(seg) as reader:  # pandas: through pyarrow
            pdf = reader.read_pandas()
        assert len(pdf) == n
        # duckdb: scans the pyarrow table / reader in-process (no IPC file reader in core)
        rows = duckdb.sql("SELECT count(*) FROM t").fetchall()[0][0]
        assert rows == n
        with pa.ipc.open_stream(seg) as reader:
            rel = duckdb.from_arrow(reader)
            assert rel.aggregate("count(*)").fetchall() == [(n,)]
    # pandas' own readers do not read the stream format (read_feather wants the IPC *file* format)
    with pytest.raises(pa.ArrowInvalid):
        pd.read_feather(segments(path, "scalars")[0])


def test_flush_makes_data_visible_and_interval_flushes(tmp_path, monkeypatch):
    path = str(tmp_path / "run")
    fifteen_flushed = threading.Event()
    original = SegmentFiles.flush

    def flush_spy(self, tables, on_error):
        original(self, tables, on_error)
        if self.rows_written["scalars"] >= 15:
            fifteen_flushed.set()

    monkeypatch.setattr(SegmentFiles, "flush", flush_spy)
    w = RunWriter(path, manifest=MANIFEST, flush_interval=0.05)
    try:
        for i in range(10):
            w.submit("scalars", {"step": i, "name": "loss", "value": i})
        w.flush()
        (seg,) = segments(path)
        assert pl.read_ipc_stream(seg).height == 10  # readable while the writer is open
        for i in range(10, 15):
            w.submit("scalars", {"step": i, "name": "loss", "value": i})
        # no flush(), and 5 items are far below the queue's high-water mark: only the
        # flush interval writes them (the wait's timeout only guards against a hang)
        assert fifteen_flushed.wait(60), "interval flush did not happen"
        assert complete_rows(seg) == 15
    finally:
        w.close()
    w.close()  # idempotent
    assert w.submit("scalars", {"step": 99, "name": "loss", "value": 0}) is False


def test_segment_rotation_and_resume_never_overwrites(tmp_path):
    path = str(tmp_path / "run")
    with RunWriter(path, manifest=MANIFEST, segment_bytes=1) as w:  # rotate after every write
        for i in range(5):
            w.submit("scalars", {"step": i, "name": "loss", "value": i})
            w.flush()

    def numbered():  # closed segments are compacted into .parquet files: the numbers
        return sorted(f.rsplit(".", 1)[0] for f in os.listdir(path) if f.startswith("scalars."))

    first = numbered()
    assert len(first) == 5 and first[-1] == "scalars.rank0.000004"
    # a restarted process appends segments (and continues the run: a new attempt)
    with pytest.warns(RuntimeWarning, match="continues the run at step 5"):
        w = RunWriter(path, manifest=MANIFEST)
    with w:
        w.submit("scalars", {"step": 5, "name": "loss", "value": 5})
    assert numbered()[:5] == first and numbered()[-1] == "scalars.rank0.000005"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the manifest counts only the restarted writer's rows
        run = load_run(path)
    assert run.scalar("loss")[0].tolist() == [0, 1, 2, 3, 4, 5]
    assert run.manifest["rows_written"]["scalars"] == 1
    assert run.manifest["first_segment"] == {"scalars": 5}
    assert [a["rows_written"]["scalars"] for a in run.manifest["attempts"]] == [5, 1]
    assert run.scalars["attempt"].to_pylist() == [0] * 5 + [1]


def test_multi_rank_concat_and_merge_hook(tmp_path):
    path = str(tmp_path / "run")
    for rank in (1, 0):
        with RunWriter(path, manifest={**MANIFEST, "world_size": 2}, rank=rank) as w:
            for step in range(3):
                w.submit("scalars", {"step": step, "name": "loss", "value": 10 * rank + step})
    run = load_run(path)
    assert run.ranks == [0, 1] and sorted(run.manifests) == [0, 1] and run.manifest["rank"] == 0
    assert run.scalars["rank"].to_pylist() == [0, 1] * 3  # sorted by (step, rank)
    assert run.scalar("loss", rank=1)[1].tolist() == [10, 11, 12]
    steps, values = run.scalar("loss", rank=None)
    assert steps.tolist() == [0, 0, 1, 1, 2, 2] and values.tolist() == [0, 10, 1, 11, 2, 12]
    assert sorted(run.per_rank["scalars"]) == [0, 1]

    seen = {}

    def rank0_only(name, per_rank, manifests):
        seen[name] = (sorted(per_rank), sorted(manifests))
        return per_rank.get(0, SCHEMAS[name].empty_table())

    run = load_run(path, merge=rank0_only)
    assert seen["scalars"] == ([0, 1], [0, 1]) and run.scalars.num_rows == 3


def test_bad_items_are_counted_not_raised(tmp_path):
    path = str(tmp_path / "run")

    def boom():
        raise RuntimeError("cuda event failed")

    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        with RunWriter(path, manifest=MANIFEST) as w:
            w.submit("scalars", {"step": 0, "name": "loss", "value": 1.0})
            assert w.submit("scalars", boom) is True  # queued; fails on the writer thread
            w.submit("scalars", boom)
            w.submit("layers", {"step": 1, "layer": ["a", "b"], "kind": "grad", "numel": [1, 2, 3]})
            w.submit("layers", {"step": 1, "layer": "a", "kind": "grad", "typo": 1})
            w.submit("scalars", {"step": 1, "name": "loss", "value": 2.0})
            w.flush()
            assert w.write_errors == 4
    msgs = [str(r.message) for r in rec if "torchvitals" in str(r.message)]
    assert len(msgs) == 1 and "cuda event failed" in msgs[0] and path in msgs[0]
    run = load_run(path)
    assert run.scalar("loss")[1].tolist() == [1.0, 2.0]
    assert run.manifest["write_errors"] == 4
    with pytest.raises(ValueError, match="unknown torchvitals table"):
        w.submit("nope", {})


def test_bad_item_strict_raises_on_training_thread(tmp_path):
    w = RunWriter(str(tmp_path / "run"), manifest=MANIFEST, strict=True)
    w.submit("scalars", lambda: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        w.flush()
    w.submit("scalars", {"step": 0, "name": "loss", "value": 1.0})
    w.close()
    assert w.write_errors == 1


# ----------------------------------------------------------------------------- faults


def test_unwritable_directory(tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("not a directory")
    path = str(afile / "run")  # fails even for root: a path component is a regular file
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        w = RunWriter(path, manifest=MANIFEST)
        assert train(w) == 200
        w.close()
    msgs = torchvitals_warnings(rec)
    assert len(msgs) == 1 and path in msgs[0] and "NotADirectoryError" in msgs[0]
    assert w.write_errors == 1 and w.dropped == 200

    with pytest.raises(NotADirectoryError):
        RunWriter(path, manifest=MANIFEST, strict=True)


# ----------------------------------------------------------------------------- memory


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


@pytest.fixture
def slow_sink(monkeypatch):
    original = SegmentFiles.write

    def slow(self, table, batch):
        time.sleep(0.001)  # a slow disk (not a timing assertion)
        return original(self, table, batch)

    monkeypatch.setattr(SegmentFiles, "write", slow)


@pytest.mark.parametrize("on_full", ["drop", "block"])
def test_soak_bounded_memory(tmp_path, slow_sink, on_full):
    n, max_pending = 100_000, 256
    path = str(tmp_path / "run")
    w = RunWriter(
        path, manifest=MANIFEST, max_pending=max_pending, on_full=on_full, flush_interval=0.05
    )
    max_queue = 0
    rss0 = None
    for i in range(n):
        w.submit("scalars", {"step": i, "name": "loss", "value": float(i)})
        if i % 64 == 0:
            max_queue = max(max_queue, w.pending)
        if i == 5_000:
            rss0 = rss_bytes()
    growth = rss_bytes() - rss0
    w.close()
    assert max_queue <= max_pending
    assert growth < 64 << 20, f"RSS grew by {growth / 2**20:.1f} MiB"
    run = load_run(path)
    written = run.scalar("loss")[0]
    assert w.write_errors == 0
    if on_full == "block":
        assert w.dropped == 0 and written.tolist() == list(range(n))
    else:
        assert len(written) + w.dropped == n
        assert run.manifest["dropped_batches"] == w.dropped
        if w.dropped:
            _steps, values = run.scalar(DROPPED_SCALAR)
            assert values[-1] == w.dropped and np.all(np.diff(values) > 0)


def test_drop_mode_never_blocks(tmp_path, monkeypatch):
    """With the disk stuck, a training loop's submits all return (the extra ones dropped)."""
    release = threading.Event()
    original = SegmentFiles.write

    def stuck(self, table, batch):
        release.wait()  # until the test releases it: a blocking submit would never return
        return original(self, table, batch)

    monkeypatch.setattr(SegmentFiles, "write", stuck)
    w = RunWriter(str(tmp_path / "run"), manifest=MANIFEST, max_pending=8, flush_interval=0.01)
    accepted = []

    def training_loop():
        accepted.append(
            sum(
                w.submit("scalars", {"step": i, "name": "loss", "value": 0.0})
                for i in range(10_000)
            )
        )

    loop = threading.Thread(target=training_loop)
    try:
        loop.start()
        loop.join(60)  # the timeout only guards against a hang: the sink stays stuck
        assert not loop.is_alive(), "submit blocked while the sink was stuck"
        (n,) = accepted
        assert w.pending <= 8 and n <= 8 + 8 + 1 and w.dropped == 10_000 - n
    finally:
        release.set()
        loop.join()
        w.close()
    run = load_run(str(tmp_path / "run"))
    assert run.scalar(DROPPED_SCALAR)[1][-1] == w.dropped
