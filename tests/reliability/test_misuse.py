"""A training process with a Monitor that is SIGKILLed, or whose disk is full."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import textwrap
import time
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import torchvitals
from torchvitals.store import segments

TRAINER = textwrap.dedent(
    """
    import sys, torch
    from torch import nn
    import torchvitals
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    mon = torchvitals.Monitor(model, sys.argv[1], optimizer=opt, flush_interval=0.1)
    step = 0
    while True:
        x = torch.randn(32, 8)
        loss = (model(x) - x.sum(1, keepdim=True)).pow(2).mean()
        opt.zero_grad(); loss.backward(); opt.step()
        mon.step(loss=loss)
        print(step, flush=True)
        step += 1
    """
)


def test_sigkill_loses_at_most_the_last_flush_interval(tmp_path):
    path = tmp_path / "run"
    script = tmp_path / "trainer.py"
    script.write_text(TRAINER)
    proc = subprocess.Popen(
        [sys.executable, str(script), str(path)], stdout=subprocess.PIPE, text=True
    )
    try:
        for line in proc.stdout:
            if int(line) >= 50:
                break
        reached = int(line)
        # The writer flushes every 0.1 s on its own: wait (while training goes on) until
        # every step up to `reached` is on disk, then kill.
        deadline = time.monotonic() + 60
        while not on_disk(path, reached):
            assert time.monotonic() < deadline, f"steps up to {reached} never reached the disk"
            time.sleep(0.05)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    assert on_disk(path, reached)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert not torchvitals.load_run(path).closed


def on_disk(path, last: int) -> bool:
    """Whether the run's loss scalars and layer rows hold every step up to ``last``."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a torn last batch is reported as a warning
        try:
            run = torchvitals.load_run(path)
        except FileNotFoundError:
            return False
    wanted = set(range(last + 1))
    if "loss" not in run.scalar_names():
        return False
    return wanted <= set(run.scalar("loss")[0].tolist()) and wanted <= set(
        run.to_pandas("layers")["step"]
    )


def test_full_disk_keeps_training_and_warns_once(tmp_path, monkeypatch):
    path = tmp_path / "run"
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        mon = torchvitals.Monitor(model, path, optimizer=opt, flush_interval=0.05)

        def disk_full(fd, data):  # the disk fills up after the start
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(segments, "write_all", disk_full)
        for _ in range(20):
            loss = model(torch.randn(4, 4)).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            mon.step(loss=loss)
        mon.close()
    disk_warnings = [w for w in caught if "No space left" in str(w.message)]
    assert len(disk_warnings) == 1
    assert mon.writer.write_errors >= 1
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_step_from_a_second_thread_is_an_error_naming_the_owner(tmp_path):
    import threading

    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    mon = torchvitals.Monitor(model, tmp_path / "run")
    mon.step(loss=1.0)
    errors = []

    def other():
        try:
            mon.step(loss=2.0)
        except RuntimeError as exc:
            errors.append(str(exc))

    thread = threading.Thread(target=other, name="intruder")
    thread.start()
    thread.join(60)
    mon.step(loss=3.0)
    mon.close()
    assert len(errors) == 1 and "'intruder'" in errors[0] and "'MainThread'" in errors[0]
    assert torchvitals.load_run(tmp_path / "run").scalar("loss")[1].tolist() == [1.0, 3.0]


def test_a_step_abandoned_in_backward_is_discarded_whole(tmp_path):
    """An exception in backward (here a backward hook; a NaN check would do the same),
    caught by the loop, which goes on with the next batch: the abandoned step's
    activations and activation gradients are discarded at the next forward, and the
    step is recorded from the batch that completed it, as if the failure never was."""
    gen = torch.Generator().manual_seed(1)
    batches = [torch.randn(5, 4, generator=gen) for _ in range(5)]
    fails = {2}  # the third batch's backward raises

    def make():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
        return model, torch.optim.SGD(model.parameters(), lr=0.1)

    def raise_at(i):
        def hook(module, grad_input, grad_output):
            if i in fails:
                raise RuntimeError("non-finite gradient")

        return hook

    def train(path, used):
        model, opt = make()
        with torchvitals.Monitor(model, path, optimizer=opt, act_grads=True) as mon:
            for i in used:
                handle = model[1].register_full_backward_hook(raise_at(i))
                try:
                    loss = model(batches[i]).pow(2).mean()
                    opt.zero_grad()
                    loss.backward()
                except RuntimeError:
                    continue
                finally:
                    handle.remove()
                opt.step()
                mon.step(loss=loss)
        df = torchvitals.load_run(path).to_pandas("layers").astype({"layer": str, "kind": str})
        return df.set_index(["step", "layer", "kind"]).sort_index()

    with pytest.warns(UserWarning, match="ended without Monitor.step"):
        got = train(tmp_path / "run", range(5))
    fails.clear()
    want = train(tmp_path / "reference", [0, 1, 3, 4])  # the batches that completed a step
    assert list(got.index) == list(want.index)
    assert set(got.index.get_level_values("kind")) == {"act", "act_grad", "grad", "weight"}
    for col in ("numel", "sumsq", "max_abs"):
        np.testing.assert_array_equal(got[col], want[col], err_msg=col)


def test_a_step_abandoned_after_the_optimizer_is_discarded_whole(tmp_path):
    """A KeyboardInterrupt (or any exception) between opt.step() and Monitor.step(),
    caught by the loop: the abandoned step's rows are dropped, the next step is whole."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with (
        pytest.warns(UserWarning, match="ended without Monitor.step"),
        torchvitals.Monitor(model, tmp_path / "run", optimizer=opt) as mon,
    ):
        for i in range(4):
            try:
                loss = model(torch.randn(4, 4)).pow(2).mean()
                opt.zero_grad()
                loss.backward()
                opt.step()
                if i == 1:
                    raise KeyboardInterrupt
                mon.step(loss=loss)
            except KeyboardInterrupt:
                continue
    layers = torchvitals.load_run(tmp_path / "run").to_pandas("layers")
    per_step = layers.groupby(["step", "kind"]).size().unstack()
    assert per_step.index.tolist() == [0, 1, 2]  # three steps recorded, none doubled
    assert (per_step["act"] == 3).all() and (per_step["grad"] == 4).all()
