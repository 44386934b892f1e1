"""Checks that need a GPU, beyond the test suite: a training step with the Monitor
(1) raises nothing under ``torch.cuda.set_sync_debug_mode("error")``, (2) can be
captured in a CUDA graph and replayed, with statistics re-read after each replay,
and (3) trains under ``torch.compile``. Prints one PASS/FAIL line per check and
exits non-zero if any fails.
"""

from __future__ import annotations

import sys
import tempfile
import traceback
from pathlib import Path

import torch
from torch import nn

import torchvitals


def model_and_data():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(64, 256), nn.GELU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10)
    ).cuda()
    x = torch.randn(128, 64, device="cuda")
    y = torch.randint(0, 10, (128,), device="cuda")
    return model, x, y


def check_no_sync(workdir: Path) -> None:
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


def check_cuda_graph(workdir: Path) -> None:
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


def check_compile(workdir: Path) -> None:
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


def main() -> int:
    if not torch.cuda.is_available():
        print("SKIP: no GPU")
        return 0
    failures = 0
    with tempfile.TemporaryDirectory() as tmp:
        for check in (check_no_sync, check_cuda_graph, check_compile):
            try:
                check(Path(tmp))
                print(f"PASS {check.__name__}")
            except Exception:
                failures += 1
                print(f"FAIL {check.__name__}\n{traceback.format_exc()}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
