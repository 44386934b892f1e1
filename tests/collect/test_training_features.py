"""Training-loop features users have: several optimizers, closures, schedulers, AMP's
GradScaler with skipped steps, torch.compile, tied parameters."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import torchvitals


def mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))


def batches(count: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(count):
        yield torch.randn(32, 8, generator=gen), torch.randint(0, 4, (32,), generator=gen)


def grad_rows(run):
    df = run.to_pandas("layers").astype({"layer": str})
    return df[df["kind"] == "grad"]


def test_several_optimizers_each_read_at_its_own_step(tmp_path):
    """GAN-style: each optimizer steps after its own backward; its gradients are read
    then, once per step, and each optimizer's lr is recorded."""
    model = mlp()
    first = torch.optim.SGD(model[0].parameters(), lr=0.1)
    second = torch.optim.Adam(model[2].parameters(), lr=0.01)
    expected = {}
    with torchvitals.Monitor(model, tmp_path / "run", optimizer=[first, second]) as mon:
        for step, (x, y) in enumerate(batches(3)):
            for opt, scale in ((first, 1.0), (second, 3.0)):  # two different backwards
                model.zero_grad()
                (scale * nn.functional.cross_entropy(model(x), y)).backward()
                for name, p in model.named_parameters():
                    if any(p is q for g in opt.param_groups for q in g["params"]):
                        expected[step, name] = p.grad.double().pow(2).sum().item()
                opt.step()
            mon.step()
    run = torchvitals.load_run(tmp_path / "run")
    grads = grad_rows(run)
    assert grads.groupby("step").size().tolist() == [4, 4, 4]
    for row in grads.itertuples():
        assert row.sumsq == pytest.approx(expected[row.step, row.layer], rel=1e-12)
    assert run.scalar("lr/opt0/group0")[1].tolist() == [0.1] * 3
    assert run.scalar("lr/opt1/group0")[1].tolist() == [0.01] * 3


def test_closure_optimizer_reads_gradients_after_the_closure(tmp_path):
    model = mlp()
    opt = torch.optim.LBFGS(model.parameters(), lr=0.1, max_iter=1)
    x, y = next(batches(1))
    expected = {}

    def closure():
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        expected.update(
            {n: p.grad.double().pow(2).sum().item() for n, p in model.named_parameters()}
        )
        return loss

    with torchvitals.Monitor(model, tmp_path / "run", optimizer=opt) as mon:
        opt.step(closure)
        mon.step()
    grads = grad_rows(torchvitals.load_run(tmp_path / "run")).set_index("layer")
    assert set(grads.index) == set(expected)
    for name, sumsq in expected.items():
        assert grads.loc[name, "sumsq"] == pytest.approx(sumsq, rel=1e-12)


def test_lr_is_the_one_the_step_used_when_the_scheduler_steps_first(tmp_path):
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    with torchvitals.Monitor(model, tmp_path / "run", optimizer=opt) as mon:
        for x, y in batches(3):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            sched.step()  # before mon.step(), as Hugging Face's Trainer does
            mon.step()
    lrs = torchvitals.load_run(tmp_path / "run").scalar("lr/group0")[1]
    np.testing.assert_allclose(lrs, [0.1, 0.05, 0.025])


def test_grad_scaler_skipped_steps_and_loss_scale(tmp_path):
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=2)
    with torchvitals.Monitor(model, tmp_path / "run", optimizer=opt, scaler=scaler) as mon:
        for step, (x, y) in enumerate(batches(6)):
            loss = nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            scaler.scale(loss).backward()
            if step in (0, 3):
                model[0].weight.grad[0, 0] = float("inf")  # an overflow: the step is skipped
            scaler.step(opt)
            scaler.update()
            mon.step(loss=loss)
    run = torchvitals.load_run(tmp_path / "run")
    assert run.scalar("skipped_step")[1].tolist() == [1, 0, 0, 1, 0, 0]
    # halved on a skip, doubled after growth_interval=2 good steps
    assert run.scalar("loss_scale")[1].tolist() == [512, 512, 1024, 512, 512, 1024]
    # skipped steps never reached the optimizer, so their gradients were not read
    assert sorted(grad_rows(run)["step"].unique()) == [1, 2, 4, 5]


def test_grad_scaler_attached_mid_training_compares_with_its_current_scale(tmp_path):
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    data = list(batches(2))
    for i, (x, y) in enumerate(data):
        opt.zero_grad()
        scaler.scale(nn.functional.cross_entropy(model(x), y)).backward()
        if i == 0:
            model[0].weight.grad[0, 0] = float("nan")
        scaler.step(opt)
        scaler.update()
    assert scaler.get_scale() == 512
    with torchvitals.Monitor(model, tmp_path / "run", optimizer=opt, scaler=scaler) as mon:
        for x, y in data:
            opt.zero_grad()
            scaler.scale(nn.functional.cross_entropy(model(x), y)).backward()
            scaler.step(opt)
            scaler.update()
            mon.step()
    assert torchvitals.load_run(tmp_path / "run").scalar("skipped_step")[1].tolist() == [0, 0]


@pytest.mark.parametrize("attach", ["before_compile", "to_compiled"])
def test_torch_compile_hooks_fire_and_match_eager(tmp_path, attach):
    runs = {}
    for mode in ("eager", "compiled"):
        model = mlp()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        path = tmp_path / mode
        if mode == "eager":
            mon = torchvitals.Monitor(model, path, optimizer=opt)
            net = model
        elif attach == "before_compile":
            mon = torchvitals.Monitor(model, path, optimizer=opt)
            net = torch.compile(model)
        else:
            net = torch.compile(model)
            mon = torchvitals.Monitor(net, path, optimizer=opt)
        with mon:
            for x, y in batches(3):
                loss = nn.functional.cross_entropy(net(x), y)
                opt.zero_grad()
                loss.backward()
                opt.step()
                mon.step(loss=loss)
        assert mon.errors == 0
        runs[mode] = torchvitals.load_run(path).to_pandas("layers").astype({"layer": str})
    eager, compiled = runs["eager"], runs["compiled"]
    keys = ["step", "layer", "kind"]
    assert compiled[keys].values.tolist() == eager[keys].values.tolist()  # same names, no prefix
    assert set(compiled["kind"]) == {"act", "grad", "weight"}
    assert compiled["numel"].tolist() == eager["numel"].tolist()
    np.testing.assert_allclose(compiled["sumsq"], eager["sumsq"], rtol=1e-5)


def test_tied_parameters_are_counted_once(tmp_path):
    torch.manual_seed(0)
    emb = nn.Embedding(20, 8)
    head = nn.Linear(8, 20, bias=False)
    head.weight = emb.weight  # tied input and output embeddings
    model = nn.Sequential(emb, nn.Tanh(), head)
    assert len(list(model.parameters())) == 1
    # the same tensor handed to two optimizers is still read once per step
    first = torch.optim.SGD([emb.weight], lr=0.0)
    second = torch.optim.SGD([head.weight], lr=0.0)
    tokens = torch.randint(0, 20, (4, 6), generator=torch.Generator().manual_seed(0))
    with torchvitals.Monitor(model, tmp_path / "run", optimizer=[first, second]) as mon:
        loss = nn.functional.cross_entropy(model(tokens).flatten(0, 1), tokens.flatten())
        loss.backward()
        expected = emb.weight.grad.double().pow(2).sum().item()  # both uses, accumulated
        first.step()
        second.step()
        mon.step()
    grads = grad_rows(torchvitals.load_run(tmp_path / "run"))
    assert grads["layer"].tolist() == ["0.weight"]
    assert grads["sumsq"].iloc[0] == pytest.approx(expected, rel=1e-12)
