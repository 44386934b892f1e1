"""The Monitor on real (small) training loops: what it records and how it behaves."""

from __future__ import annotations

import math
import threading
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import torchvitals
from torchvitals.engine.reference import tensor_stats_reference


def small_cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(8 * 6 * 6, 16),
        nn.Tanh(),
        nn.Linear(16, 4),
    )


def minibatches(count: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(count):
        yield torch.randn(16, 3, 6, 6, generator=gen), torch.randint(0, 4, (16,), generator=gen)


def train(model, opt, mon, steps=5, **step_kwargs):
    for x, y in minibatches(steps):
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        mon.step(loss=loss, **step_kwargs)
    return loss


def layer_rows(run, kind: str, step: int | None = None):
    df = run.to_pandas("layers")
    df = df[df["kind"] == kind]
    return df if step is None else df[df["step"] == step]


def test_two_lines_record_every_step(tmp_path):
    model = small_cnn()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with torchvitals.Monitor(model, tmp_path / "run", optimizer=opt) as mon:
        train(model, opt, mon, steps=6, accuracy=0.5)
    run = torchvitals.load_run(tmp_path / "run")
    steps, loss = run.scalar("loss")
    assert steps.tolist() == list(range(6)) and np.isfinite(loss).all()
    assert run.scalar("lr/group0")[1].tolist() == [0.05] * 6
    assert run.scalar("accuracy")[1].tolist() == [0.5] * 6
    assert set(run.scalar_names()) >= {"grad_norm", "step_time", "grad_nonfinite"}
    # The monitor's own cost: positive, and a part of the step it was spent in.
    _, hook_time = run.scalar("torchvitals/hook_time")
    _, step_time = run.scalar("step_time")
    assert (hook_time > 0).all() and (hook_time[1:] < step_time[1:]).all()
    grads = layer_rows(run, "grad")
    assert sorted(grads["step"].unique()) == list(range(6))
    assert set(grads["layer"]) == {n for n, _ in model.named_parameters()}
    acts = layer_rows(run, "act", step=0)
    assert list(acts["layer"]) == ["0", "1", "2", "4", "5", "6"]  # forward order
    hist = run.to_pandas("hist")
    assert len(hist) == len(run.to_pandas("layers"))
    layers = {entry["name"]: entry for entry in run.manifest["layers"]}
    assert layers["5"]["measures"] == "input" and layers["2"]["type"] == "ReLU"


def test_gradient_statistics_equal_float64_reference(tmp_path):
    model = small_cnn()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)  # keep the weights: grads stay checkable
    grads = {}
    with torchvitals.Monitor(model, tmp_path / "run", optimizer=opt) as mon:
        x, y = next(minibatches(1))
        nn.functional.cross_entropy(model(x), y).backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        opt.step()
        mon.step()
    run = torchvitals.load_run(tmp_path / "run")
    rows = layer_rows(run, "grad", step=0).set_index("layer")
    ref = tensor_stats_reference(list(grads.values()))
    for i, name in enumerate(grads):
        assert rows.loc[name, "numel"] == ref["numel"][i]
        assert rows.loc[name, "sumsq"] == pytest.approx(float(ref["sumsq"][i]), rel=1e-12)
        assert rows.loc[name, "max_abs"] == float(ref["max_abs"][i])
    total = math.sqrt(sum(float(g.double().pow(2).sum()) for g in grads.values()))
    assert run.scalar("grad_norm")[1][0] == pytest.approx(total, rel=1e-12)


def test_dead_relu_units_and_saturated_tanh(tmp_path):
    model = small_cnn()
    with torch.no_grad():
        model[4].bias[:5] = -1e4  # five Tanh units pinned at -1 for every sample
        model[1].bias[:3] = -1e4  # three BatchNorm channels -> dead ReLU channels
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    with torchvitals.Monitor(model, tmp_path / "run", optimizer=opt) as mon:
        train(model, opt, mon, steps=2)
    acts = layer_rows(torchvitals.load_run(tmp_path / "run"), "act", step=0).set_index("layer")
    assert acts.loc["2", "units"] == 8 and acts.loc["2", "dead_units"] == 3  # ReLU, NCHW dim 1
    assert acts.loc["5", "units"] == 16 and acts.loc["5", "saturated_units"] == 5  # Tanh input
    # only what a module measures is written; the rest is null
    assert math.isnan(acts.loc["5", "dead_units"])  # a Tanh input has no dead units
    assert math.isnan(acts.loc["4", "dead_units"])  # a Linear output is no rectifier
    assert math.isnan(acts.loc["2", "saturated"])  # a ReLU does not saturate
    assert math.isnan(acts.loc["4", "saturated"]) and acts.loc["4", "large"] >= 0
    assert math.isnan(acts.loc["5", "large"])
    assert acts.loc["5", "saturated"] >= 5 * 16


def test_nonfinite_values_are_counted_not_raised(tmp_path):
    model = small_cnn()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with torchvitals.Monitor(model, tmp_path / "run", optimizer=opt) as mon:
        x, y = next(minibatches(1))
        x[0, 0, 0, 0] = math.nan
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        mon.step(loss=loss)
    run = torchvitals.load_run(tmp_path / "run")
    assert math.isnan(run.scalar("loss")[1][0])
    acts = layer_rows(run, "act", step=0).set_index("layer")
    assert acts.loc["0", "nan"] > 0
    assert run.scalar("grad_nonfinite")[1][0] > 0


def test_gradient_accumulation_records_once_per_optimizer_step(tmp_path):
    model = small_cnn()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with torchvitals.Monitor(model, tmp_path / "run", optimizer=opt) as mon:
        data = list(minibatches(8))
        for i in range(0, 8, 4):
            opt.zero_grad()
            for x, y in data[i : i + 4]:
                (nn.functional.cross_entropy(model(x), y) / 4).backward()
            opt.step()
            mon.step()
    run = torchvitals.load_run(tmp_path / "run")
    grads = layer_rows(run, "grad")
    assert grads.groupby("step").size().tolist() == [len(list(model.parameters()))] * 2
    acts = layer_rows(run, "act")
    assert acts.groupby("step").size().tolist() == [6, 6]  # first micro-batch of each step


def test_frozen_parameters_and_step_without_backward(tmp_path):
    model = small_cnn()
    for p in model[0].parameters():
        p.requires_grad_(False)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01)
    with torchvitals.Monitor(model, tmp_path / "run", optimizer=opt) as mon:
        train(model, opt, mon, steps=1)
        mon.step(loss=1.0)  # no backward, no optimizer step
    run = torchvitals.load_run(tmp_path / "run")
    grads = layer_rows(run, "grad")
    assert "0.weight" not in set(grads["layer"])
    assert grads["step"].unique().tolist() == [0]
    assert run.scalar("loss")[1].tolist()[1] == 1.0


def test_without_optimizer_grads_are_read_in_step(tmp_path):
    model = small_cnn()
    with torchvitals.Monitor(model, tmp_path / "run") as mon:
        x, y = next(minibatches(1))
        nn.functional.cross_entropy(model(x), y).backward()
        mon.step()
    grads = layer_rows(torchvitals.load_run(tmp_path / "run"), "grad")
    assert len(grads) == len(list(model.parameters()))


def test_sparse_gradients(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(50, 8, sparse=True), nn.Linear(8, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with torchvitals.Monitor(model, tmp_path / "run", optimizer=opt) as mon:
        out = model(torch.tensor([1, 2, 2, 7]))
        out.sum().backward()
        expected = model[0].weight.grad.coalesce().values().double().pow(2).sum()
        opt.step()
        mon.step()
    rows = layer_rows(torchvitals.load_run(tmp_path / "run"), "grad").set_index("layer")
    assert rows.loc["0.weight", "sumsq"] == pytest.approx(float(expected), rel=1e-12)


def test_attaching_twice_and_closing_mid_run(tmp_path):
    model = small_cnn()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    mon = torchvitals.Monitor(model, tmp_path / "a", optimizer=opt)
    with pytest.raises(RuntimeError, match="already attached"):
        torchvitals.Monitor(model, tmp_path / "b", optimizer=opt)
    train(model, opt, mon, steps=2)
    mon.close()
    mon.close()  # idempotent
    assert not model._forward_hooks and not model._forward_pre_hooks
    assert all(not m._forward_hooks for m in model.modules())
    with pytest.warns(UserWarning, match="after close"):
        train(model, opt, mon, steps=1)  # training goes on; nothing recorded
    assert torchvitals.load_run(tmp_path / "a").scalar("loss")[0].tolist() == [0, 1]
    second = torchvitals.Monitor(model, tmp_path / "b", optimizer=opt)  # allowed after close
    second.close()


def test_activations_at_their_own_cadence(tmp_path):
    model = small_cnn()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with torchvitals.Monitor(model, tmp_path / "run", optimizer=opt, act_every=3) as mon:
        train(model, opt, mon, steps=7)
    run = torchvitals.load_run(tmp_path / "run")
    assert sorted(layer_rows(run, "act")["step"].unique()) == [0, 3, 6]
    assert sorted(layer_rows(run, "grad")["step"].unique()) == list(range(7))


def test_strict_monitor_on_an_unwritable_path_leaves_no_hooks(tmp_path):
    model = small_cnn()
    afile = tmp_path / "afile"
    afile.write_text("a file, not a directory")
    with pytest.raises(OSError):
        torchvitals.Monitor(model, afile / "run", strict=True)
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    torchvitals.Monitor(model, tmp_path / "run").close()  # the model is free to attach again


def test_outputs_modified_in_place_later_are_measured_before_the_change(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 32), nn.ReLU(inplace=True), nn.Linear(32, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    x = torch.randn(64, 6)
    with (
        pytest.warns(UserWarning, match="modified in place"),
        torchvitals.Monitor(model, tmp_path / "run", optimizer=opt) as mon,
    ):
        for _ in range(3):
            model(x).sum().backward()
            opt.step()
            mon.step()
    linear_out = model[0](x).detach()
    acts = layer_rows(torchvitals.load_run(tmp_path / "run"), "act")
    first = acts[acts["layer"] == "0"]
    assert first["step"].tolist() == [1, 2]  # step 0 saw the overwritten tensor: dropped
    ref = tensor_stats_reference([linear_out], feature_dim=-1, saturation=6.0)
    for _, row in first.iterrows():
        assert row["zeros"] == 0 and row["sum"] == pytest.approx(float(ref["sum"][0]), rel=1e-9)
    relu = acts[acts["layer"] == "1"]
    assert (relu["zeros"] > 0).all() and relu["step"].tolist() == [0, 1, 2]


def test_activation_gradients_once_per_step_under_accumulation(tmp_path):
    model = small_cnn()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with torchvitals.Monitor(model, tmp_path / "run", optimizer=opt, act_grads=True) as mon:
        for x, y in minibatches(2):
            for _ in range(3):  # three micro-batches per optimizer step
                nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            opt.zero_grad()
            mon.step()
    rows = layer_rows(torchvitals.load_run(tmp_path / "run"), "act_grad")
    assert rows.groupby(["step", "layer"]).size().max() == 1
    assert sorted(rows["step"].unique()) == [0, 1]


def test_weights_every_n_steps(tmp_path):
    model = small_cnn()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with torchvitals.Monitor(model, tmp_path / "run", optimizer=opt, weight_every=3) as mon:
        train(model, opt, mon, steps=7)
    weights = layer_rows(torchvitals.load_run(tmp_path / "run"), "weight")
    assert sorted(weights["step"].unique()) == [0, 3, 6]


def test_selection_include_exclude_and_activation_gradients(tmp_path):
    model = small_cnn()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    mon = torchvitals.Monitor(
        model, tmp_path / "run", optimizer=opt, types=(nn.ReLU,), include=["4"],
        exclude=["2"], act_grads=True,
    )  # fmt: skip
    with mon:
        train(model, opt, mon, steps=2)
    run = torchvitals.load_run(tmp_path / "run")
    assert set(layer_rows(run, "act")["layer"]) == {"4"}
    assert set(layer_rows(run, "act_grad")["layer"]) == {"4"}


def test_grad_scaler_loss_scale_recorded(tmp_path):
    model = small_cnn()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    with torchvitals.Monitor(model, tmp_path / "run", optimizer=opt, scaler=scaler) as mon:
        for x, y in minibatches(2):
            loss = nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            mon.step(loss=loss)
    run = torchvitals.load_run(tmp_path / "run")
    assert run.scalar("loss_scale")[1].tolist() == [1024.0, 1024.0]


def test_telemetry_failure_never_breaks_training(tmp_path, monkeypatch):
    model = small_cnn()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    mon = torchvitals.Monitor(model, tmp_path / "run", optimizer=opt)

    def broken(*args, **kwargs):
        raise RuntimeError("engine exploded")

    monkeypatch.setattr("torchvitals.collect.reductions.fused_stats", broken)
    with pytest.warns(RuntimeWarning, match="engine exploded"):
        loss = train(model, opt, mon, steps=3)
    assert torch.isfinite(loss) and mon.errors >= 3
    mon.close()
    strict = torchvitals.Monitor(model, tmp_path / "strict", optimizer=opt, strict=True)
    with pytest.raises(RuntimeError, match="engine exploded"):
        train(model, opt, strict, steps=1)
    strict.close()


def test_no_host_reads_on_the_training_thread(tmp_path, monkeypatch):
    """CPU stand-in for the GPU sync check: the hooks and step() never call .item(),
    .tolist() or .cpu(); only the writer thread reads values."""
    main = threading.get_ident()
    offenders = []
    for name in ("item", "tolist", "cpu", "numpy"):
        original = getattr(torch.Tensor, name)

        def spy(self, *args, _original=original, _name=name, **kwargs):
            if threading.get_ident() == main:
                offenders.append(_name)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, spy)
    model = small_cnn()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    mon = torchvitals.Monitor(model, tmp_path / "run", optimizer=opt)
    offenders.clear()
    train(model, opt, mon, steps=3, lr_scale=torch.tensor(0.5))
    assert offenders == []
    monkeypatch.undo()
    mon.close()
    assert torchvitals.load_run(tmp_path / "run").scalar("lr_scale")[1].tolist() == [0.5] * 3


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_training_step_with_monitor_never_syncs(tmp_path):
    model = small_cnn().cuda()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    mon = torchvitals.Monitor(model, tmp_path / "run", optimizer=opt)
    data = [(x.cuda(), y.cuda()) for x, y in minibatches(4)]

    def one_step(x, y):
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        mon.step(loss=loss)

    one_step(*data[0])  # warm-up: descriptor tables, pinned buffers, lazy init
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for x, y in data[1:]:
            one_step(x, y)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    mon.close()
    run = torchvitals.load_run(tmp_path / "run")
    assert run.scalar("loss")[0].tolist() == [0, 1, 2, 3]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert len(layer_rows(run, "grad")) == 4 * len(list(model.parameters()))
