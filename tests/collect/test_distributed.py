"""Distributed runs: two real processes on CPU with the gloo backend (DDP, FSDP2, a rank
killed mid-run), compared with one process training on the same global batches; and the
exact merge on shards made by hand."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import warnings

import numpy as np
import pyarrow as pa
import pytest
import torch
from dist_worker import FLUSHED_UNTIL, KILL_AT, LR, STEPS, global_batches, make_model
from torch import nn

import torchvitals
from torchvitals.collect.distributed import recording_ranks
from torchvitals.store.merge import (
    MERGED_RANK,
    MissingRanksWarning,
    merge_ranks,
    rank_coverage,
    shard_holders,
    whole_layer_rows,
)
from torchvitals.store.reader import load_run
from torchvitals.store.writer import RunWriter

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "dist_worker.py")
PARAMS = ["0.weight", "0.bias", "2.weight", "2.bias", "4.weight", "4.bias"]

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available(), reason="torch built without torch.distributed"
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(mode: str, path, world: int = 2, timeout: float = 120) -> list[tuple[int, str]]:
    """Starts ``world`` ranks of dist_worker.py as torchrun would; ``[(returncode, output)]``."""
    port = _free_port()
    procs = []
    for rank in range(world):
        env = dict(
            os.environ,
            RANK=str(rank),
            WORLD_SIZE=str(world),
            LOCAL_RANK=str(rank),
            LOCAL_WORLD_SIZE=str(world),
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
            OMP_NUM_THREADS="1",
        )
        procs.append(
            subprocess.Popen(
                [sys.executable, WORKER, mode, str(path)],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    results = []
    try:
        for proc in procs:
            out, _ = proc.communicate(timeout=timeout)
            results.append((proc.returncode, out))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return results


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One process, the whole global batch: what the merged ranks must reproduce."""
    path = tmp_path_factory.mktemp("reference") / "run"
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    with torchvitals.Monitor(model, path, optimizer=opt, weight_every=1) as mon:
        for x, y in global_batches():
            loss = nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            mon.step(loss=loss)
    return load_run(path)


def param_rows(run, kind: str):
    df = run.to_pandas("layers")
    df = df[df["kind"] == kind].astype({"layer": str})
    return df.set_index(["step", "layer"]).sort_index()


def assert_same_param_stats(merged, ref):
    assert list(merged.index) == list(ref.index)
    for col in ("numel", "nan", "inf"):
        assert merged[col].tolist() == ref[col].tolist()
    # fp32 tolerance: the processes' gradients are summed (all-reduce, reduce-scatter) in
    # another order than one process's; the merge itself is exact (hand-made shards below)
    for col in ("sumsq", "max_abs"):
        np.testing.assert_allclose(merged[col], ref[col], rtol=1e-5, atol=1e-12)


def test_ddp_grads_once_on_rank0_activations_per_rank(tmp_path, reference):
    path = tmp_path / "run"
    results = launch("ddp", path)
    assert [rc for rc, _ in results] == [0, 0], results[0][1][-3000:] + results[1][1][-3000:]
    with warnings.catch_warnings():
        warnings.simplefilter("error", MissingRanksWarning)
        run = load_run(path, merge=merge_ranks)
    assert run.closed and run.ranks == [0, 1]

    grads = param_rows(run, "grad")
    assert set(grads["rank"]) == {0}  # identical on every rank after the all-reduce
    assert_same_param_stats(grads, param_rows(reference, "grad"))
    ref_norm = reference.scalar("grad_norm")[1]
    np.testing.assert_allclose(run.scalar("grad_norm", rank=0)[1], ref_norm, rtol=1e-5)
    assert run.scalar("grad_norm", rank=1)[1].size == 0
    assert set(param_rows(run, "weight")["rank"]) == {0}

    acts = run.to_pandas("layers")
    acts = acts[acts["kind"] == "act"]
    assert sorted(acts["rank"].unique()) == [0, 1]  # each rank's slice of the batch
    a0, a1 = (acts[acts["rank"] == r].set_index(["step", "layer"])["sumsq"] for r in (0, 1))
    assert not np.allclose(a0.to_numpy(), a1.to_numpy())

    dist = run.manifests[1]["distributed"]
    assert dist["wrapper"] == "DistributedDataParallel" and dist["grads_on"] == "rank0"
    assert dist["ddp_group_ranks"] == [0, 1] and dist["backend"] == "gloo"
    assert run.manifests[1]["world_size"] == 2
    assert {e["name"] for e in run.manifest["layers"]} == {"0", "1", "2", "3", "4"}  # unwrapped

    # live mode: the global view one all_reduce gives, written by every rank
    losses = [run.scalar("loss", rank=r)[1] for r in (0, 1)]
    for r in (0, 1):
        steps, live_loss = run.scalar("global/loss", rank=r)
        assert steps.tolist() == list(range(STEPS))
        np.testing.assert_allclose(live_loss, (losses[0] + losses[1]) / 2, rtol=1e-12)
        live_norm = run.scalar("global/grad_norm", rank=r)[1]
        np.testing.assert_allclose(live_norm, ref_norm, rtol=1e-5)


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory):
    """A 2-rank FSDP2 run (each rank a shard of every parameter), as the ranks wrote it."""
    path = tmp_path_factory.mktemp("fsdp") / "run"
    results = launch("fsdp", path)
    assert [rc for rc, _ in results] == [0, 0], results[0][1][-3000:] + results[1][1][-3000:]
    return path


def test_fsdp2_shards_merge_into_the_full_parameters(fsdp_run, reference):
    path = fsdp_run
    with warnings.catch_warnings():
        warnings.simplefilter("error", MissingRanksWarning)
        run = load_run(path, merge=merge_ranks)

    # each rank wrote its local shard of every parameter (3 rows split 2 + 1)
    local = {r: run.per_rank["layers"][r].to_pandas() for r in (0, 1)}
    for r in (0, 1):
        rows = local[r][(local[r]["kind"] == "grad") & (local[r]["step"] == 0)]
        assert rows.set_index("layer")["numel"].astype(int).to_dict()["4.bias"] == 2 - r
    grads = param_rows(run, "grad")
    assert set(grads["rank"]) == {MERGED_RANK} and (grads["shards_complete"] == 1).all()
    assert_same_param_stats(grads, param_rows(reference, "grad"))
    acts = run.to_pandas("layers").query("kind == 'act'")
    assert acts["shards_complete"].isna().all()  # not a sharded parameter's row
    assert whole_layer_rows(run.layers).equals(run.layers)

    weights, ref_weights = param_rows(run, "weight"), param_rows(reference, "weight")
    assert_same_param_stats(weights, ref_weights)
    for col in ("zeros", "saturated"):  # saturated: null on parameters, in both
        np.testing.assert_array_equal(weights[col], ref_weights[col], err_msg=col)
    hist, ref_hist = (
        r.to_pandas("hist").astype({"layer": str, "kind": str}).query("kind != 'act'")
        for r in (run, reference)
    )
    assert set(hist["rank"]) == {MERGED_RANK}
    assert hist[["step", "layer", "kind"]].values.tolist() == (
        ref_hist[["step", "layer", "kind"]].values.tolist()
    )
    assert [c.tolist() for c in hist["counts"]] == [c.tolist() for c in ref_hist["counts"]]

    ref_norm = reference.scalar("grad_norm")[1]
    np.testing.assert_allclose(run.scalar("grad_norm", rank=MERGED_RANK)[1], ref_norm, rtol=1e-5)
    np.testing.assert_allclose(run.scalar("global/grad_norm")[1], ref_norm, rtol=1e-5)
    acts = run.to_pandas("layers")
    assert sorted(acts[acts["kind"] == "act"]["rank"].unique()) == [0, 1]

    dist = run.manifests[0]["distributed"]
    assert set(dist["sharded"]) == set(PARAMS)
    assert dist["sharded"]["4.weight"] == {
        "mesh": 0,
        "placements": ["Shard(dim=0)"],
        "local_shape": [2, 16],
    }
    assert dist["meshes"] == [{"shape": [2], "dim_names": [], "coordinate": [0], "first_rank": 0}]
    assert shard_holders(run.manifests) == {name: {0, 1} for name in PARAMS}


def test_a_missing_ranks_partial_shards_are_never_whole_layers(fsdp_run, reference, tmp_path):
    path = tmp_path / "run"
    shutil.copytree(fsdp_run, path)
    for f in path.glob("*.rank1.*"):  # rank 1's manifest and segments lost
        f.unlink()
    with pytest.warns(MissingRanksWarning) as caught:
        run = load_run(path, merge=merge_ranks)
    incomplete = [str(w.message) for w in caught if "are incomplete" in str(w.message)]
    assert len(incomplete) == 2  # layers and hist
    assert f"for {', '.join(sorted(PARAMS))}; " in incomplete[0]
    assert "shards_complete = 0" in incomplete[0]

    # rank 0's half-shards are kept as they are, flagged: their norms are not the layer's
    grads = param_rows(run, "grad")
    assert set(grads["rank"]) == {0} and (grads["shards_complete"] == 0).all()
    whole = param_rows(reference, "grad")
    assert (np.sqrt(grads["sumsq"]) < np.sqrt(whole["sumsq"])).all()
    assert (grads["numel"] < whole["numel"]).all()
    for table in ("layers", "hist"):
        kept = whole_layer_rows(run.table(table)).to_pandas().astype({"kind": str})
        assert set(kept["kind"]) == {"act"}, table  # every parameter row was partial
        assert set(kept["rank"]) == {0} and kept["shards_complete"].isna().all()
    # activations are whole per rank: unchanged
    acts = run.to_pandas("layers").query("kind == 'act'").reset_index(drop=True)
    kept = whole_layer_rows(run.layers).to_pandas().reset_index(drop=True)
    assert acts.drop(columns="shards_complete").equals(kept.drop(columns="shards_complete"))


def test_rank_killed_mid_run_leaves_the_other_readable(tmp_path):
    path = tmp_path / "run"
    (rc0, _), (rc1, _) = launch("fsdp_kill", path)
    assert rc1 == -signal.SIGKILL
    assert rc0 != 0  # rank 0 failed at its next collective (peer gone), exited through atexit

    with pytest.warns(MissingRanksWarning) as caught:
        run = load_run(path, merge=merge_ranks)
    messages = [str(w.message) for w in caught]
    lost = f"{FLUSHED_UNTIL}-{KILL_AT - 1}"
    assert any(f"rank 1 has no data for step(s) {lost}" in m for m in messages), messages
    assert any("did not close cleanly" in m for m in messages)
    assert any(f"step(s) {lost} are incomplete (missing rank(s) 1)" in m for m in messages)

    assert not run.closed
    assert run.scalar("loss", rank=0)[0].tolist() == list(range(KILL_AT))
    assert run.scalar("loss", rank=1)[0].tolist() == list(range(FLUSHED_UNTIL))
    grads = param_rows(run, "grad")
    complete = grads.loc[list(range(FLUSHED_UNTIL))]
    assert set(complete["rank"]) == {MERGED_RANK}
    partial = grads.loc[list(range(FLUSHED_UNTIL, KILL_AT))]
    assert set(partial["rank"]) == {0}  # rank 0's shards alone: kept, not merged
    assert (complete["shards_complete"] == 1).all() and (partial["shards_complete"] == 0).all()
    whole = whole_layer_rows(run.layers).to_pandas().query("kind == 'grad'")
    assert sorted(set(whole["step"])) == list(range(FLUSHED_UNTIL))
    coverage = rank_coverage(run.per_rank["scalars"], run.manifests)
    assert coverage.missing_steps[1] == list(range(FLUSHED_UNTIL, KILL_AT))
    assert coverage.unclosed == (1,) and not coverage.complete


# --- the merge on hand-made shards ------------------------------------------------------


def sharded_layout(world: int, legacy: bool = False) -> dict:
    """The ``distributed`` manifest entry of a parameter ``w`` sharded over every rank;
    ``legacy``: as schema version 2 wrote it (every recording rank listed)."""
    if legacy:
        return {"grads_on": "rank0", "sharded": {"w": {"recorded_by": list(range(world))}}}
    return {
        "grads_on": "rank0",
        "meshes": [{"shape": [world], "first_rank": 0}],
        "sharded": {"w": {"mesh": 0, "placements": ["Shard(dim=0)"]}},
    }


def write_shards(
    path, shards: dict[int, list[torch.Tensor]], world: int, sharded=True, legacy=False
):
    """One RunWriter per rank, writing the engine's statistics of its shards (one
    parameter ``w`` per step) the way the Monitor does."""
    for rank, tensors in shards.items():
        dist = sharded_layout(world, legacy) if sharded else {}
        manifest = {"world_size": world, "distributed": dist}
        with RunWriter(path, manifest=manifest, rank=rank) as w:
            for step, t in enumerate(tensors):
                s = torchvitals.tensor_stats([t], saturation=1.5)
                cols = {k: v.numpy() for k, v in s.items() if k not in ("hist", "neg_hist")}
                hist = {"counts": s["hist"], "neg_counts": s["neg_hist"]}
                w.submit("layers", {"step": step, "layer": "w", "kind": "grad", **cols})
                w.submit("hist", {"step": step, "layer": "w", "kind": "grad", **hist})
                w.submit("layers", {"step": step, "layer": "x", "kind": "act", **cols})
                w.submit("hist", {"step": step, "layer": "x", "kind": "act", **hist})
                norm = float(s["sumsq"][0]) ** 0.5
                w.submit("scalars", {"step": step, "name": "grad_norm", "value": norm})


def test_merged_shards_equal_the_statistics_of_the_whole_tensor(tmp_path):
    gen = torch.Generator().manual_seed(0)
    full = [torch.randn(7, 5, generator=gen) * 3 for _ in range(2)]
    full[1][2, 1], full[1][4, 0], full[1][0, 0] = float("nan"), float("-inf"), 0.0
    cuts = [(0, 4), (4, 7), (7, 7)]  # uneven, and rank 2's shard is empty
    shards = {r: [t[a:b] for t in full] for r, (a, b) in enumerate(cuts)}
    write_shards(tmp_path, shards, world=3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        run = load_run(tmp_path, merge=merge_ranks)

    layers = run.to_pandas("layers").astype({"layer": str})
    merged = layers[layers["layer"] == "w"]
    assert merged["rank"].tolist() == [MERGED_RANK, MERGED_RANK]
    hist = run.to_pandas("hist").astype({"layer": str})
    for step, t in enumerate(full):
        want = torchvitals.tensor_stats([t], saturation=1.5)
        row = merged[merged["step"] == step].iloc[0]
        for key in ("numel", "nan", "inf", "zeros", "saturated", "max_abs"):
            assert row[key] == want[key][0].item(), key
        for key in ("sum", "sumsq"):
            assert row[key] == pytest.approx(want[key][0].item(), rel=1e-12)
        hist_row = hist[(hist["layer"] == "w") & (hist["step"] == step)].iloc[0]
        assert hist_row["counts"].tolist() == want["hist"][0].tolist()
        assert hist_row["neg_counts"].tolist() == want["neg_hist"][0].tolist()
    # activations stay per rank; the global gradient norm gets a rank -1 row
    assert sorted(layers[layers["layer"] == "x"]["rank"].unique()) == [0, 1, 2]
    norms = run.scalar("grad_norm", rank=MERGED_RANK)[1]
    expected = [torch.nan_to_num(t, nan=0, posinf=0, neginf=0).double().norm() for t in full]
    np.testing.assert_allclose(norms, expected, rtol=1e-12)
    # rows come out as load_run promises: by step, merged rows first
    assert layers["step"].is_monotonic_increasing
    assert layers.groupby("step")["rank"].apply(lambda r: r.is_monotonic_increasing).all()


def test_manifests_of_schema_version_2_merge_the_same(tmp_path):
    gen = torch.Generator().manual_seed(1)
    full = [torch.randn(6, 3, generator=gen) for _ in range(3)]
    shards = {r: [t[2 * r : 2 * r + 2] for t in full] for r in range(3)}
    runs = []
    for legacy in (False, True):
        write_shards(tmp_path / str(legacy), shards, world=3, legacy=legacy)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            runs.append(load_run(tmp_path / str(legacy), merge=merge_ranks))
    for name in ("scalars", "layers", "hist"):
        assert runs[0].table(name).equals(runs[1].table(name)), name
    assert set(runs[0].layers.column("rank").to_pylist()) == {MERGED_RANK, 0, 1, 2}


def test_recording_ranks_are_derived_from_mesh_and_placements():
    hsdp = {"shape": [2, 4], "first_rank": 8}  # ranks 8-15: replicas along dim 0
    odd = {"shape": [2, 2], "ranks": [[3, 1], [7, 5]]}  # not consecutive: listed
    manifests = {
        0: {
            "distributed": {
                "meshes": [hsdp, odd],
                "sharded": {
                    "a": {"mesh": 0, "placements": ["Replicate()", "Shard(dim=0)"]},
                    "b": {"mesh": 0, "placements": ["Shard(dim=0)", "Replicate()"]},
                    "c": {"mesh": 1, "placements": ["Shard(dim=0)", "Shard(dim=1)"]},
                    "d": {"mesh": 1, "placements": ["Shard(dim=0)", "Replicate()"]},
                    "bad": {"mesh": 5, "placements": ["Shard(dim=0)"]},
                },
            }
        },
        # another rank, in the old format, records one more parameter: the union counts
        1: {"distributed": {"sharded": {"e": {"recorded_by": [0, 2]}}}},
    }
    assert shard_holders(manifests) == {
        "a": {8, 9, 10, 11},
        "b": {8, 12},
        "c": {1, 3, 5, 7},
        "d": {3, 7},
        "e": {0, 2},
    }


def test_a_rank_that_wrote_nothing_is_reported_and_nothing_merged(tmp_path):
    t = torch.randn(6, 4)
    write_shards(tmp_path, {0: [t[:3]]}, world=2)
    with pytest.warns(MissingRanksWarning) as caught:
        run = load_run(tmp_path, merge=merge_ranks)
    messages = " | ".join(str(w.message) for w in caught)
    assert "world_size=2: rank 1 wrote nothing" in messages
    assert "missing rank(s) 1" in messages
    layers = run.to_pandas("layers")
    assert set(layers["rank"]) == {0} and (layers["numel"] == 12).all()
    assert run.scalar("grad_norm", rank=MERGED_RANK)[1].size == 0
    coverage = rank_coverage(run.per_rank["scalars"], run.manifests)
    assert coverage.missing == (1,) and coverage.missing_steps[1] == [0]


def test_unsharded_runs_merge_as_a_concatenation(tmp_path):
    t = torch.randn(6, 4)
    write_shards(tmp_path, {0: [t, t], 1: [t, t]}, world=2, sharded=False)
    merged = load_run(tmp_path, merge=merge_ranks)
    plain = load_run(tmp_path, merge=torchvitals.store.reader.concat_ranks)
    for name in ("scalars", "layers", "hist"):
        assert merged.table(name).equals(plain.table(name))


def test_replicated_mesh_dimensions_are_recorded_once():
    from torch.distributed.tensor import Replicate, Shard

    mesh = torch.arange(8).view(2, 4)  # HSDP: replicate across dim 0, shard across dim 1
    assert recording_ranks(mesh, [Replicate(), Shard(0)]) == [0, 1, 2, 3]
    assert recording_ranks(mesh, [Shard(0), Replicate()]) == [0, 4]
    assert recording_ranks(mesh, [Shard(0), Shard(1)]) == list(range(8))
    assert recording_ranks(torch.arange(4), [Replicate()]) == [0]


def test_empty_tables_merge(tmp_path):
    RunWriter(tmp_path, manifest={"world_size": 1}, rank=0).close()
    run = load_run(tmp_path, merge=merge_ranks)
    assert all(
        isinstance(run.table(n), pa.Table) and run.table(n).num_rows == 0 for n in run.tables
    )
