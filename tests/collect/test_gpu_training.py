"""A training step with the Monitor on a GPU: (1) no host sync on the training thread
(``torch.cuda.set_sync_debug_mode("error")``), (2) captured in a CUDA graph and
replayed, with statistics re-read after each replay, and (3) under ``torch.compile``.
Skipped without a GPU."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import torchvitals

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU")


def model_and_data():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(64, 256), nn.GELU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10)
    ).cuda()
    x = torch.randn(128, 64, device="cuda")
    y = torch.randint(0, 10, (128,), device="cuda")
    return model, x, y


def test_training_step_makes_no_host_sync(tmp_path):
    workdir = tmp_path
    model, x, y = model_and_data()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    mon = torchvitals.Monitor(model, workdir / "sync", optimizer=opt)

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        mon.step(loss=loss)

    step()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(5):
            step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    mon.close()
    steps = torchvitals.load_run(workdir / "sync").scalar("loss")[0]
    assert steps.tolist() == list(range(6)), steps


def test_training_step_captured_in_a_cuda_graph(tmp_path):
    workdir = tmp_path
    model, x, y = model_and_data()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, capturable=True)
    mon = torchvitals.Monitor(model, workdir / "graph", optimizer=opt)
    static_x, static_y = x.clone(), y.clone()

    def body():
        loss = nn.functional.cross_entropy(model(static_x), static_y)
        loss.backward()
        opt.step()
        return loss

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):  # warm-up: optimizer state, descriptor tables, hooks
            opt.zero_grad(set_to_none=False)
            body()
            mon.step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    opt.zero_grad(set_to_none=False)
    with torch.cuda.graph(graph):
        static_loss = body()
    losses = []
    for _ in range(5):
        static_x.normal_()
        graph.replay()
        mon.step(loss=static_loss)
        losses.append(static_loss.clone())
    mon.close()
    run = torchvitals.load_run(workdir / "graph")
    layers = run.to_pandas("layers")
    replayed = layers[layers["step"] >= 3]
    assert sorted(replayed["step"].unique()) == [3, 4, 5, 6, 7], replayed["step"].unique()
    grads = replayed[replayed["kind"] == "grad"].groupby("step")["sumsq"].sum()
    assert grads.nunique() == 5, "statistics did not change between replays"
    recorded = run.scalar("loss")[1]
    assert torch.allclose(torch.tensor(recorded), torch.stack(losses).double().cpu())


def test_training_step_under_torch_compile(tmp_path):
    workdir = tmp_path
    model, x, y = model_and_data()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    mon = torchvitals.Monitor(model, workdir / "compile", optimizer=opt)
    compiled = torch.compile(model)
    first = None
    for _ in range(20):
        loss = nn.functional.cross_entropy(compiled(x), y)
        first = float(loss) if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
        mon.step(loss=loss)
    mon.close()
    assert float(loss) < first, (first, float(loss))
    layers = torchvitals.load_run(workdir / "compile").to_pandas("layers")
    assert set(layers["kind"]) >= {"grad", "act"}, set(layers["kind"])
