"""``torchvitals export tensorboard``: a real recorded run (a ReLU, a tanh, a NaN made in a
module at a known step) exported and read back with TensorBoard's own event reader; the
values, steps and histogram buckets must be the run's."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import training_runs as tr

from torchvitals.cli import main
from torchvitals.engine.histogram import MAX_EXP, MIN_EXP, NONFINITE_BIN, NUM_BINS
from torchvitals.store.reader import load_run

pytest.importorskip("tensorboard", reason="the export is read back with tensorboard")

NAN_AT = 30


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    path = tmp_path_factory.mktemp("tb") / "run"
    tr.planted_nan(path, at=NAN_AT, steps=40, hidden=16)
    return load_run(path)


def accumulator(logdir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0, "histograms": 0})
    acc.Reload()
    return acc


def rows(table: pa.Table) -> list[dict]:
    return table.cast(
        pa.schema(
            [
                pa.field(f.name, pa.string()) if pa.types.is_dictionary(f.type) else f
                for f in table.schema
            ]
        )
    ).to_pylist()


def test_scalars_layers_and_histograms_read_back_exactly(run, tmp_path, capsys):
    logdir = tmp_path / "tb"
    assert main(["export", "tensorboard", str(run.path), str(logdir)]) == 0
    assert "tensorboard --logdir" in capsys.readouterr().out
    acc = accumulator(logdir)
    tags = acc.Tags()

    # Every scalar, at its steps; TensorBoard stores float32.
    expected: dict[str, list] = {}
    for r in rows(run.scalars):
        expected.setdefault(r["name"], []).append((r["step"], r["value"]))
    assert set(expected) <= set(tags["scalars"])
    for name, pairs in expected.items():
        got = [(e.step, e.value) for e in acc.Scalars(name)]
        want = [(s, float(np.float32(v))) for s, v in pairs]
        assert len(got) == len(want)
        for (gs, gv), (ws, wv) in zip(got, want, strict=True):
            assert gs == ws and (gv == wv or (np.isnan(gv) and np.isnan(wv))), name

    # Per layer: norm, max|x|, non-finite counts (the NaN at NAN_AT), dead fraction.
    layer_rows = rows(run.layers)
    for r in layer_rows:
        key = f"{r['kind']}_norm/{r['layer']}"
        got = {e.step: e.value for e in acc.Scalars(key)}
        assert got[r["step"]] == np.float32(np.sqrt(r["sumsq"])), key
        got = {e.step: e.value for e in acc.Scalars(f"{r['kind']}_max_abs/{r['layer']}")}
        assert got[r["step"]] == np.float32(r["max_abs"])
        if r["dead_units"] is not None and r["units"]:
            got = {e.step: e.value for e in acc.Scalars(f"act_dead_frac/{r['layer']}")}
            assert got[r["step"]] == np.float32(r["dead_units"] / r["units"])
    bad = [r for r in layer_rows if r["nan"] + r["inf"]]
    assert bad and min(r["step"] for r in bad) == NAN_AT
    for r in bad:
        got = {e.step: e.value for e in acc.Scalars(f"{r['kind']}_nonfinite/{r['layer']}")}
        assert got[r["step"]] == r["nan"] + r["inf"]
    nonfinite_tags = {t for t in tags["scalars"] if "_nonfinite/" in t}
    assert nonfinite_tags == {f"{r['kind']}_nonfinite/{r['layer']}" for r in bad}

    # Histograms: the run's finite bins, exactly, on the log2 axis; NaN/Inf left out.
    hist_rows = rows(run.hist)
    assert hist_rows
    seen = 0
    for tag in tags["histograms"]:
        kind, _, layer = tag.partition("_hist/")
        by_step = {
            r["step"]: r["counts"] for r in hist_rows if r["kind"] == kind and r["layer"] == layer
        }
        for event in acc.Histograms(tag):
            h = event.histogram_value
            counts = np.asarray(by_step.pop(event.step))
            used = np.flatnonzero(counts[:NONFINITE_BIN])
            assert list(h.bucket) == counts[used[0] : used[-1] + 1].tolist()
            assert h.num == counts[:NONFINITE_BIN].sum() == counts.sum() - counts[NONFINITE_BIN]
            # bucket i of the log2 axis ends at: zero bin MIN-1, below MIN, 2^k bin k+1
            ends = [MIN_EXP - 1, MIN_EXP, *range(MIN_EXP + 1, MAX_EXP + 2), MAX_EXP + 2]
            assert len(ends) == NUM_BINS - 1
            assert list(h.bucket_limit) == ends[used[0] : used[-1] + 1]
            seen += 1
        # rows left: only NaN/Inf in them, so no histogram
        assert all(np.asarray(c)[:NONFINITE_BIN].sum() == 0 for c in by_step.values())
    assert seen >= len(hist_rows) - sum(
        1 for r in hist_rows if sum(r["counts"][:NONFINITE_BIN]) == 0
    )


def test_one_directory_per_rank(tmp_path):
    from torchvitals.store.writer import RunWriter

    path = tmp_path / "run"
    rng = np.random.default_rng()
    values = rng.normal(size=(2, 5))
    for rank in (0, 1):
        with RunWriter(path, manifest={"world_size": 2}, rank=rank, on_full="block") as w:
            for step in range(5):
                w.submit("scalars", {"step": step, "name": "loss", "value": values[rank, step]})
    logdir = tmp_path / "tb"
    assert main(["export", "tensorboard", str(path), str(logdir)]) == 0
    for rank in (0, 1):
        got = [e.value for e in accumulator(logdir / f"rank{rank}").Scalars("loss")]
        assert got == values[rank].astype(np.float32).tolist()


def test_a_logdir_in_use_is_refused(run, tmp_path, capsys):
    logdir = tmp_path / "tb"
    logdir.mkdir()
    (logdir / "events.out.tfevents.old").write_bytes(b"")
    assert main(["export", "tensorboard", str(run.path), str(logdir)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(logdir) in err[0] and "not an empty directory" in err[0]


def test_without_tensorboard_one_line_names_it(run, tmp_path, capsys, monkeypatch):
    import sys

    for name in [
        m for m in sys.modules if m.startswith(("tensorboard", "torch.utils.tensorboard"))
    ]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "tensorboard", None)
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    assert main(["export", "tensorboard", str(run.path), str(tmp_path / "tb")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "torchvitals export tensorboard: needs tensorboard, which is not installed: "
        "pip install tensorboard"
    ]
