"""The Monitor under torch.compile: it adds no recompile and no graph break (frame
compiles, guard failures and breaks counted with and without it, more steps than
Dynamo's recompile limit), whatever the activation cadence, and records what eager
records."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from torch._dynamo.utils import counters, guard_failures

import torchvitals
from torchvitals.collect import distributed

F = nn.functional
STEPS = 10  # more than Dynamo's recompile limit (8): a per-step guard would show


def model_and_optimizer():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 4)
    )
    return model, torch.optim.SGD(model.parameters(), lr=0.1)


def minibatches(count: int):
    gen = torch.Generator().manual_seed(1)
    for _ in range(count):
        yield torch.randn(32, 8, generator=gen), torch.randint(0, 4, (32,), generator=gen)


def train(variant: str, path=None, mode=None, accumulate: int = 1, **monitor_args):
    """Trains STEPS steps in ``variant``; returns Dynamo's counts and the Monitor."""
    torch._dynamo.reset()
    counters.clear()
    guard_failures.clear()
    model, opt = model_and_optimizer()
    mon = torchvitals.Monitor(model, path, optimizer=opt, **monitor_args) if path else None

    def forward_backward(net, x, y):
        loss = F.cross_entropy(net(x), y) / accumulate
        loss.backward()
        return loss

    if variant == "torch.compile(model)":
        net = torch.compile(model, mode=mode)
        step = lambda x, y: forward_backward(net, x, y)  # noqa: E731
    elif variant == "model.compile()":
        model.compile(mode=mode)
        step = lambda x, y: forward_backward(model, x, y)  # noqa: E731
    else:  # a compiled training step, optimizer included

        @torch.compile(mode=mode)
        def step(x, y):
            loss = forward_backward(model, x, y)
            if accumulate == 1:
                opt.step()
                opt.zero_grad()
            return loss

    for i, (x, y) in enumerate(minibatches(STEPS * accumulate)):
        loss = step(x, y)
        if (i + 1) % accumulate:
            continue
        if variant != "compiled step" or accumulate > 1:
            opt.step()
            opt.zero_grad()
        if mon is not None:
            mon.step(loss=loss)
    if mon is not None:
        mon.close()
        assert mon.errors == 0
    return {
        "frames": counters["frames"]["total"],
        "breaks": sum(counters["graph_break"].values()),
        "recompiles": sum(len(v) for v in guard_failures.values()),
    }


@pytest.mark.parametrize("mode", [None, "reduce-overhead"])
@pytest.mark.parametrize("variant", ["torch.compile(model)", "model.compile()", "compiled step"])
def test_monitor_adds_no_recompile_and_no_graph_break(tmp_path, variant, mode):
    plain = train(variant, mode=mode)
    monitored = train(variant, tmp_path / "run", mode=mode)
    assert monitored["recompiles"] == plain["recompiles"] == 0, monitored
    assert monitored["breaks"] == plain["breaks"], (plain, monitored)
    # model.compile() compiles nothing of a hook-free Sequential in this torch; with the
    # hooks it compiles the forward once.
    assert monitored["frames"] <= max(plain["frames"], 1), (plain, monitored)
    acts = torchvitals.load_run(tmp_path / "run").to_pandas("layers").query("kind == 'act'")
    assert sorted(acts["step"].unique()) == list(range(STEPS))


@pytest.mark.parametrize("settings", [{"act_every": 3}, {"every": 2}, {"accumulate": 2}], ids=str)
def test_cadence_and_accumulation_are_no_guards(tmp_path, settings):
    accumulate = settings.pop("accumulate", 1)
    counts = train("torch.compile(model)", tmp_path / "run", accumulate=accumulate, **settings)
    assert counts == {"frames": 1, "breaks": 0, "recompiles": 0}
    layers = torchvitals.load_run(tmp_path / "run").to_pandas("layers")
    steps = {k: sorted(layers.query(f"kind == '{k}'")["step"].unique()) for k in ("act", "grad")}
    act_every = settings.get("act_every", settings.get("every", 1))
    assert steps["act"] == list(range(0, STEPS, act_every))
    assert steps["grad"] == list(range(0, STEPS, settings.get("every", 1)))
    per_step = layers.query("kind == 'act'").groupby("step").size()
    assert (per_step == 5).all()  # one forward's activations per step, also when accumulating


@pytest.mark.parametrize("variant", ["torch.compile(model)", "model.compile()", "compiled step"])
def test_compiled_statistics_equal_eager(tmp_path, variant):
    model, opt = model_and_optimizer()
    with torchvitals.Monitor(model, tmp_path / "eager", optimizer=opt) as mon:
        for x, y in minibatches(STEPS):
            F.cross_entropy(model(x), y).backward()
            opt.step()
            opt.zero_grad()
            mon.step()
    train(variant, tmp_path / "compiled")
    eager, compiled = (
        torchvitals.load_run(tmp_path / name).to_pandas("layers").astype({"layer": str})
        for name in ("eager", "compiled")
    )
    keys = ["step", "layer", "kind"]
    assert compiled[keys].values.tolist() == eager[keys].values.tolist()
    assert set(compiled["kind"]) == {"act", "grad", "weight"}
    counts = ("numel", "nan", "inf", "zeros", "saturated", "units", "saturated_units")
    for column in (*counts, "dead_units", "large"):  # exact, nulls in the same rows
        np.testing.assert_array_equal(compiled[column], eager[column], err_msg=column)
    for column in ("sumsq", "max_abs"):
        np.testing.assert_allclose(compiled[column], eager[column], rtol=1e-6, err_msg=column)


def test_plain_tensors_are_no_dtensors_without_reading_sys_modules(monkeypatch):
    # A compiled optimizer step traces this check for every gradient. Reading sys.modules
    # there made Dynamo walk it, and an import during the walk failed the compile at every
    # step (154 frames against 15 in CI; a hard error with frequent collections).
    monkeypatch.setattr(distributed, "sys", None)
    assert not distributed.is_dtensor(torch.zeros(2))
    assert not distributed.is_dtensor(nn.Parameter(torch.zeros(2)))
