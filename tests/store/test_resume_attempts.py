"""A run resumed in its directory: attempts, supersession of an earlier attempt's rows at
the steps a later one restarted from, a crashed attempt, a resume without start_step,
and a run of schema version 2 resumed."""

from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import sys
import textwrap
import warnings

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest
import torch
from torch import nn

import torchvitals
from torchvitals.store.merge import (
    SupersededRowsWarning,
    merge_ranks,
    supersede,
    superseded_rows,
)
from torchvitals.store.reader import load_run
from torchvitals.store.schema import SCHEMAS
from torchvitals.store.writer import RunWriter

STEPS = 10


def batches(seed: int = 3):
    gen = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(16, 6, generator=gen), torch.randn(16, 2, generator=gen)) for _ in range(STEPS)
    ]


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 2))


def train(model, opt, mon, data, steps: range) -> None:
    """The training steps ``steps``, on their batches of ``data``."""
    for step in steps:
        x, y = data[step]
        loss = nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        mon.step(loss=loss)


def frame(run, kind: str | None = None):
    df = run.to_pandas("layers").astype({"layer": str, "kind": str})
    if kind is not None:
        df = df[df["kind"] == kind]
    return df.set_index(["step", "layer", "kind"]).sort_index()


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One uninterrupted run of every step: what a resumed run must read back as."""
    path = tmp_path_factory.mktemp("reference") / "run"
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    with torchvitals.Monitor(model, path, optimizer=opt, weight_every=1) as mon:
        train(model, opt, mon, batches(), range(STEPS))
    return load_run(path)


def test_two_attempts_read_back_as_the_uninterrupted_run(tmp_path, reference):
    path = tmp_path / "run"
    data = batches()
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    checkpoint_at, crashed_after = 4, 7
    with torchvitals.Monitor(model, path, optimizer=opt, weight_every=1) as mon:
        train(model, opt, mon, data, range(checkpoint_at))
        checkpoint = copy.deepcopy((model.state_dict(), opt.state_dict()))
        train(model, opt, mon, data, range(checkpoint_at, crashed_after))  # then "lost"
    assert mon.writer.attempt == 0

    # the job is restarted from the checkpoint, into the same directory
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    model.load_state_dict(checkpoint[0])
    opt.load_state_dict(checkpoint[1])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a declared restart: nothing to warn about
        mon = torchvitals.Monitor(
            model, path, optimizer=opt, weight_every=1, start_step=checkpoint_at
        )
    assert mon.writer.attempt == 1 and mon.step_count == checkpoint_at
    with mon:
        train(model, opt, mon, data, range(checkpoint_at, STEPS))

    with pytest.warns(SupersededRowsWarning) as caught:
        run = load_run(path)
    assert len(caught) == 1 and not run.problems  # the row counts match the disk
    message = str(caught[0].message)
    assert f"of attempt 0 at step(s) {checkpoint_at}-{crashed_after - 1}" in message
    assert f"superseded by a later attempt from step {checkpoint_at}" in message

    # every (step, layer, kind) once, the statistics of the uninterrupted run
    got, want = frame(run), frame(reference)
    assert list(got.index) == list(want.index)
    assert got["numel"].tolist() == want["numel"].tolist()
    np.testing.assert_allclose(got["sumsq"], want["sumsq"], rtol=1e-6)
    np.testing.assert_allclose(run.scalar("loss")[1], reference.scalar("loss")[1], rtol=1e-6)
    assert run.scalar("loss")[0].tolist() == list(range(STEPS))
    steps = run.scalars.column("step").to_numpy()
    attempts = run.scalars.column("attempt").to_numpy()
    assert (attempts == (steps >= checkpoint_at)).all()
    assert run.hist.num_rows == reference.hist.num_rows

    per_step = {t: reference.table(t).num_rows // STEPS for t in SCHEMAS}
    for table in SCHEMAS:  # attempt 0's rows of steps 4-6, in every table
        want_superseded = per_step[table] * (crashed_after - checkpoint_at)
        assert superseded_rows(run.table(table)) == want_superseded, table

    attempts = run.manifest["attempts"]
    assert [a["start_step"] for a in attempts] == [0, checkpoint_at]
    assert all("closed_at" in a for a in attempts) and run.manifest["attempt"] == 1
    on_disk = {t: sum(a["rows_written"].get(t, 0) for a in attempts) for t in SCHEMAS}
    assert on_disk == {t: per_step[t] * (crashed_after + STEPS - checkpoint_at) for t in SCHEMAS}


CHILD = textwrap.dedent(
    """
    import os, signal, sys
    sys.path.insert(0, {tests!r})
    import torch, torchvitals
    from test_resume_attempts import batches, make_model, train
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    mon = torchvitals.Monitor(model, sys.argv[1], optimizer=opt, weight_every=1)
    train(model, opt, mon, batches(), range(int(sys.argv[2])))
    mon.writer.flush()
    os.kill(os.getpid(), signal.SIGKILL)
    """
)


def test_a_crashed_attempt_is_resumed_from_its_checkpoint(tmp_path, reference):
    path = tmp_path / "run"
    code = CHILD.format(tests=os.path.dirname(os.path.abspath(__file__)))
    child = subprocess.run([sys.executable, "-c", code, str(path), "6"], timeout=300)
    assert child.returncode == -signal.SIGKILL
    crashed = json.loads((path / "manifest.rank0.json").read_text())
    assert "closed_at" not in crashed and crashed["attempts"][0]["start_step"] == 0

    # the last checkpoint was taken at step 3: train the first 3 steps again to rebuild it
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    data = batches()
    for x, y in data[:3]:
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    with torchvitals.Monitor(model, path, optimizer=opt, weight_every=1, start_step=3) as mon:
        train(model, opt, mon, data, range(3, STEPS))
    with pytest.warns(SupersededRowsWarning, match=r"attempt 0 at step\(s\) 3-5"):
        run = load_run(path)
    got, want = frame(run), frame(reference)
    assert list(got.index) == list(want.index)
    np.testing.assert_allclose(got["sumsq"], want["sumsq"], rtol=1e-6)
    attempts = run.manifest["attempts"]
    assert "closed_at" not in attempts[0] and "closed_at" in attempts[1]
    assert [a["start_step"] for a in attempts] == [0, 3]


def test_resume_without_start_step_continues_after_the_last_step(tmp_path):
    path = tmp_path / "run"
    data = batches()
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with torchvitals.Monitor(model, path, optimizer=opt) as mon:
        train(model, opt, mon, data, range(4))
    with pytest.warns(RuntimeWarning, match=r"1 attempt\(s\) of rank 0 \(last step 3\)"):
        mon = torchvitals.Monitor(model, path, optimizer=opt)
    assert mon.step_count == 4 and mon.writer.attempt == 1
    with mon:
        for x, y in data[:3]:  # the loop counts from 0 again; the Monitor does not
            loss = nn.functional.mse_loss(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            mon.step(loss=loss)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing superseded, nothing mixed
        run = load_run(path)
    assert run.scalar("loss")[0].tolist() == list(range(7))
    assert run.scalars.filter(pc.equal(run.scalars["step"], 5))["attempt"][0].as_py() == 1
    assert [a["start_step"] for a in run.manifest["attempts"]] == [0, 4]
    assert all(superseded_rows(run.table(t)) == 0 for t in SCHEMAS)


def write_version_2_run(path, steps: int) -> None:
    """A run as schema version 2 wrote it: no attempt column, no ``attempts``."""
    os.makedirs(path)
    for table, cols in (
        ("scalars", {"name": ["loss"], "value": [1.0]}),
        ("layers", {"layer": ["w"], "kind": ["grad"], "numel": [4], "sumsq": [2.0]}),
    ):
        schema = pa.schema([f for f in SCHEMAS[table] if f.name != "attempt"])
        meta = {b"torchvitals.table": table.encode(), b"torchvitals.schema_version": b"2"}
        schema = schema.with_metadata(meta)
        rows = [{"step": s, "rank": 0, **{k: v[0] for k, v in cols.items()}} for s in range(steps)]
        with pa.ipc.new_stream(os.path.join(path, f"{table}.rank0.000000.arrows"), schema) as w:
            w.write_table(pa.Table.from_pylist(rows, schema=schema))
    manifest = {"schema_version": 2, "rank": 0, "world_size": 1, "started_at": "T0"}
    manifest.update(closed_at="T1", rows_written={"scalars": steps, "layers": steps})
    manifest["first_segment"] = {"scalars": 0, "layers": 0}
    with open(os.path.join(path, "manifest.rank0.json"), "w") as f:
        json.dump(manifest, f)


def test_a_run_of_schema_version_2_reads_and_resumes(tmp_path):
    path = str(tmp_path / "run")
    write_version_2_run(path, steps=6)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        old = load_run(path)
    assert old.scalars.num_rows == 6 and old.scalars["attempt"].null_count == 6

    with RunWriter(path, manifest={"world_size": 1}, start_step=4) as w:
        assert w.attempt == 1
        for step in (4, 5, 6):
            w.submit("scalars", {"step": step, "name": "loss", "value": 2.0})
            w.submit("layers", {"step": step, "layer": "w", "kind": "grad", "numel": 4})
    with pytest.warns(SupersededRowsWarning, match=r"2 row\(s\) of attempt 0 at step\(s\) 4-5"):
        run = load_run(path)
    assert run.scalar("loss")[1].tolist() == [1.0] * 4 + [2.0] * 3
    assert run.scalars["attempt"].to_pylist() == [None] * 4 + [1] * 3
    assert superseded_rows(run.layers) == 2
    first = run.manifest["attempts"][0]  # the version-2 manifest, as attempt 0
    assert first == {
        "start_step": None,
        "started_at": "T0",
        "closed_at": "T1",
        "rows_written": {"scalars": 6, "layers": 6},
        "first_segment": {"scalars": 0, "layers": 0},
    }


def test_supersession_works_on_any_subset_of_steps(tmp_path):
    """A lazy reader merges chunk by chunk: each chunk superseded alone gives the rows of
    the whole run superseded at once, restricted to the chunk."""
    rng = np.random.default_rng(7)
    manifests = {
        0: {"attempts": [{"start_step": 0}, {"start_step": 20}, {"start_step": 12}]},
        1: {"attempts": [{"start_step": 0}, {"start_step": None}, {"start_step": 30}]},
        2: {},  # schema version 2: one attempt
    }
    spans = {0: [(0, 25), (20, 28), (12, 40)], 1: [(0, 10), (10, 35), (30, 40)], 2: [(0, 40)]}
    per_rank = {}
    for rank, ranges in spans.items():
        rows = [(s, a) for a, (lo, hi) in enumerate(ranges) for s in range(lo, hi)]
        rows = [rows[i] for i in rng.permutation(len(rows))]
        per_rank[rank] = pa.table(
            {
                "step": pa.array([s for s, _ in rows], pa.int64()),
                "rank": pa.array([rank] * len(rows), pa.int32()),
                "attempt": pa.array([None if rank == 2 else a for _, a in rows], pa.int32()),
                "name": pa.array(["loss"] * len(rows)).dictionary_encode(),
                "value": pa.array(rng.normal(size=len(rows))),
            }
        )
    whole, report = supersede(per_rank, manifests)
    # expected by hand: rank 0 keeps attempt 0 below 12, attempt 2 from 12 on (attempt 1
    # is superseded whole); rank 1 keeps 0-9 of attempt 0, 10-29 of 1, 30-39 of 2
    owners = {0: lambda s: 0 if s < 12 else 2, 1: lambda s: 0 if s < 10 else 1 if s < 30 else 2}
    for rank, owner in owners.items():
        t = whole[rank].sort_by("step")
        assert t["step"].to_pylist() == list(range(40))
        assert t["attempt"].to_pylist() == [owner(s) for s in range(40)]
    assert whole[2].num_rows == 40 and report.rows == 13 + 8 + 5
    assert set(report.by_attempt) == {(0, 0), (0, 1), (1, 1)}

    def steps_in(t, lo, hi):
        return t.filter(pc.and_(pc.greater_equal(t["step"], lo), pc.less(t["step"], hi)))

    for lo, hi in ((0, 11), (11, 21), (21, 40), (5, 33)):
        got, _ = supersede({r: steps_in(t, lo, hi) for r, t in per_rank.items()}, manifests)
        for r in per_rank:
            assert got[r].equals(steps_in(whole[r], lo, hi)), (lo, hi, r)


def test_rows_below_their_attempts_start_are_reported_as_mixed(tmp_path):
    path = str(tmp_path / "run")
    with RunWriter(path, manifest={}) as w:
        for step in range(3):
            w.submit("scalars", {"step": step, "name": "loss", "value": 1.0})
    with pytest.warns(RuntimeWarning, match="continues the run at step 3"):
        w = RunWriter(path, manifest={})
    with w:
        w.submit("scalars", {"step": 0, "name": "loss", "value": 2.0})  # written again
    with pytest.warns(SupersededRowsWarning, match=r"attempt 1 of rank 0 starts at step 3"):
        run = load_run(path, merge=merge_ranks)
    assert run.scalar("loss")[1].tolist() == [1.0, 2.0, 1.0, 1.0]  # kept, and said so


def test_start_step_must_be_a_step(tmp_path):
    with pytest.raises(ValueError, match="start_step must be a non-negative integer, got -1"):
        RunWriter(tmp_path, manifest={}, start_step=-1)
