"""The merge and the per-layer series on a Dask cluster of two worker processes: exactly
the single-machine result (load_run, and the bounded-memory scan)."""

from __future__ import annotations

import itertools

import numpy as np
import pyarrow as pa
import pytest

distributed = pytest.importorskip("distributed", reason="dask[distributed] is not installed")
pytest.importorskip("dask.dataframe", reason="dask[dataframe] is not installed")

from test_scan_run import write_rank  # noqa: E402

from torchvitals.analysis.runtables import series_from_run  # noqa: E402
from torchvitals.analysis.summary import histogram_matrix  # noqa: E402
from torchvitals.store.distributed_scan import (  # noqa: E402
    merged_frame,
    scan_run_distributed,
    step_ranges,
)
from torchvitals.store.reader import load_run  # noqa: E402
from torchvitals.store.scan import scan_run  # noqa: E402


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("dask") / "run"
    rng = np.random.default_rng(23)
    for rank in range(3):
        write_rank(path, rank, rng, 120, world=3)
    return path


@pytest.fixture(scope="module")
def client():
    cluster = distributed.LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None
    )
    with cluster, distributed.Client(cluster) as c:
        yield c


def test_series_on_two_worker_processes_equal_one_machine(run_dir, client):
    with pytest.warns(RuntimeWarning):  # rank 2 misses steps
        want = series_from_run(load_run(run_dir))
    run = scan_run_distributed(run_dir, client=client, partitions=5)
    with pytest.warns(RuntimeWarning):
        got = series_from_run(run)
    for a, b in zip(got[:3], want[:3], strict=True):
        np.testing.assert_array_equal(a, b)
    assert list(got[3]) == list(want[3])
    for key in want[3]:
        np.testing.assert_array_equal(got[3][key], want[3][key], err_msg=key)
    # the scalars and a histogram, merged on the workers
    with pytest.warns(RuntimeWarning):
        loaded = load_run(run_dir)
    assert run.scalars.to_pylist() == loaded.scalars.to_pylist()
    g, w = run.histogram("stem", "act"), histogram_matrix(loaded, "stem", "act")
    np.testing.assert_array_equal(g[0], w[0])
    np.testing.assert_array_equal(g[1], w[1])


def test_merged_dataframe_equals_load_run(run_dir, client):
    with pytest.warns(RuntimeWarning):
        want = load_run(run_dir).layers
    frame = merged_frame(run_dir, "layers", partitions=4)
    assert frame.npartitions == 4
    got = frame.compute()
    strings = {n: want[n].cast(pa.string()) for n in ("layer", "kind")}
    want = want.to_pandas()
    for name, col in strings.items():
        want[name] = col.to_pylist()
    assert got.reset_index(drop=True).equals(want)


def test_step_ranges_cover_every_unit(run_dir):
    units = scan_run(run_dir).units("layers")
    ranges = step_ranges(units, 7)
    assert ranges[0][0] == min(u.min_step for u in units)
    assert ranges[-1][1] == max(u.max_step for u in units) + 1
    assert all(a[1] == b[0] for a, b in itertools.pairwise(ranges))
    with pytest.raises(ValueError, match="partitions=0"):
        step_ranges(units, 0)
