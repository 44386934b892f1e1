"""scan_run: the lazy, bounded-memory reading gives exactly what load_run gives."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from torchvitals.analysis.runtables import series_from_run
from torchvitals.analysis.summary import histogram_matrix
from torchvitals.store import compaction, scan
from torchvitals.store.reader import load_run
from torchvitals.store.scan import scan_run
from torchvitals.store.writer import RunWriter

LAYERS = ["stem", "block.0", "block.1", "head"]
KINDS = ["grad", "act", "weight"]


def write_rank(path, rank, rng, steps, world):
    manifest = {"world_size": world, "layers": [{"name": n} for n in LAYERS]}
    with RunWriter(path, manifest=manifest, rank=rank, on_full="block", segment_bytes=6000) as w:
        for step in range(steps):
            if rank == 2 and step % 7 == 3:
                continue  # a rank that misses steps
            w.submit("scalars", {"step": step, "name": ["loss", "lr/group0", "grad_norm"],
                                 "value": rng.random(3)})  # fmt: skip
            n = len(LAYERS) * len(KINDS)
            kinds = [k for _ in LAYERS for k in KINDS]
            # rank 0 records parameters, every rank its activations
            keep = [rank == 0 or k == "act" for k in kinds]
            layer = [name for name in LAYERS for _ in KINDS]
            sel = np.flatnonzero(keep)
            w.submit(
                "layers",
                {
                    "step": step,
                    "layer": [layer[i] for i in sel],
                    "kind": [kinds[i] for i in sel],
                    "numel": rng.integers(10, 100, n)[sel],
                    "nan": (rng.random(n) < 0.02).astype(np.int64)[sel],
                    "inf": np.zeros(n, np.int64)[sel],
                    "units": np.full(n, 8)[sel],
                    "dead_units": rng.integers(0, 8, n)[sel],
                    "saturated": rng.integers(0, 10, n)[sel],
                    "sumsq": rng.random(n)[sel],
                },
            )
            w.submit("hist", {"step": step, "layer": [layer[i] for i in sel],
                              "kind": [kinds[i] for i in sel],
                              "counts": rng.integers(0, 50, (len(sel), 6))})  # fmt: skip
            if step % 5 == 0:
                w.flush()


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("scan") / "run"
    rng = np.random.default_rng(7)
    for rank in range(3):
        write_rank(path, rank, rng, 90, world=3)
    return path


def test_scanned_series_equal_the_loaded_ones(run_dir, monkeypatch):
    monkeypatch.setattr(scan, "CHUNK_ROWS", 50)  # many chunks, each merged on its own
    assert len(list(run_dir.glob("layers.rank0.*.parquet"))) > 2
    with pytest.warns(RuntimeWarning):  # rank 2's missing steps
        run = load_run(run_dir)
        want = series_from_run(run)
    seen = []
    with pytest.warns(RuntimeWarning):
        got = series_from_run(str(run_dir), progress=lambda done, total: seen.append(done))
    assert seen and seen[-1] == max(seen)
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])
    np.testing.assert_array_equal(got[2], want[2])
    assert list(got[3]) == list(want[3])
    for key in want[3]:
        np.testing.assert_array_equal(got[3][key], want[3][key], err_msg=key)


def test_scanned_tables_and_histograms_equal_the_loaded_ones(run_dir, monkeypatch):
    monkeypatch.setattr(scan, "CHUNK_ROWS", 30)
    with pytest.warns(RuntimeWarning):
        run = load_run(run_dir)
        scanned = scan_run(run_dir)
        assert scanned.scalars.equals(run.scalars)
        layers = pa.concat_tables(list(scanned.chunks("layers")))
    assert layers.unify_dictionaries().combine_chunks().cast(run.layers.schema).to_pylist() == (
        run.layers.to_pylist()
    )
    for layer, kind in [("stem", "act"), ("head", "grad"), ("nope", "grad")]:
        want = histogram_matrix(run, layer, kind)
        got = scanned.histogram(layer, kind)
        if want is None:
            assert got is None
            continue
        np.testing.assert_array_equal(got[0], want[0])
        np.testing.assert_array_equal(got[1], want[1])


def test_small_row_groups_scan_the_same(tmp_path, monkeypatch):
    monkeypatch.setattr(compaction, "ROW_GROUP_BYTES", 2000)
    rng = np.random.default_rng(3)
    write_rank(tmp_path, 0, rng, 60, world=1)
    monkeypatch.setattr(scan, "CHUNK_ROWS", 10)
    want = series_from_run(load_run(tmp_path))
    got = series_from_run(tmp_path)
    for key in want[3]:
        np.testing.assert_array_equal(got[3][key], want[3][key], err_msg=key)


def test_sharded_parameters_merge_the_same_chunk_by_chunk(tmp_path, monkeypatch):
    """Shards of a parameter on two ranks combine into rank -1 rows: the same per chunk."""
    rng = np.random.default_rng(11)
    dist = {"grads_on": "rank0", "sharded": {"fc.weight": {"recorded_by": [0, 1]}}}
    for rank in range(2):
        manifest = {"world_size": 2, "distributed": dist, "layers": [{"name": "fc"}]}
        with RunWriter(tmp_path, manifest=manifest, rank=rank, on_full="block",
                       segment_bytes=3000) as w:  # fmt: skip
            for step in range(50):
                w.submit("scalars", {"step": step, "name": ["loss", "grad_norm"],
                                     "value": rng.random(2)})  # fmt: skip
                w.submit("layers", {"step": step, "layer": ["fc.weight", "fc"],
                                    "kind": ["grad", "act"], "numel": [6, 4],
                                    "sumsq": rng.random(2), "max_abs": rng.random(2)})  # fmt: skip
                w.submit("hist", {"step": step, "layer": ["fc.weight"], "kind": ["grad"],
                                  "counts": rng.integers(0, 9, (1, 5))})  # fmt: skip
                if step % 4 == 0:
                    w.flush()
    monkeypatch.setattr(scan, "CHUNK_ROWS", 7)
    run = load_run(tmp_path)
    assert (run.layers["rank"].to_numpy() == -1).sum() == 50  # merged: one row per step
    scanned = scan_run(tmp_path)
    layers = pa.concat_tables(list(scanned.chunks("layers")))
    assert layers.unify_dictionaries().combine_chunks().to_pylist() == run.layers.to_pylist()
    assert scanned.scalars.to_pylist() == run.scalars.to_pylist()
    got, want = scanned.histogram("fc.weight", "grad"), histogram_matrix(run, "fc.weight", "grad")
    np.testing.assert_array_equal(got[1], want[1])
    a, b = series_from_run(tmp_path), series_from_run(run)
    assert list(a[3]) == list(b[3])
    for key in b[3]:
        np.testing.assert_array_equal(a[3][key], b[3][key], err_msg=key)


def test_several_histograms_in_one_pass(run_dir):
    pairs = [("stem", "act"), ("head", "grad"), ("block.1", "weight"), ("nope", "act")]
    with pytest.warns(RuntimeWarning):
        run = load_run(run_dir)
        got = scan_run(run_dir).histograms(pairs)
    assert set(got) == {p for p in pairs if histogram_matrix(run, *p) is not None}
    for pair, (steps, counts) in got.items():
        want = histogram_matrix(run, *pair)
        np.testing.assert_array_equal(steps, want[0])
        np.testing.assert_array_equal(counts, want[1])


def test_detect_events_on_a_path_reads_lazily_and_agrees(run_dir):
    from torchvitals.analysis import detect_events

    with pytest.warns(RuntimeWarning):
        want = detect_events(run=load_run(run_dir))
    with pytest.warns(RuntimeWarning):
        got = detect_events(run=str(run_dir))
    assert [e.to_dict() for e in got] == [e.to_dict() for e in want]
