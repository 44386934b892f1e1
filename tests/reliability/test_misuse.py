"""Consistent state under misuse: a step abandoned by an exception (in forward, in
backward, after the optimizer) or a KeyboardInterrupt is discarded whole; ``step()``
from a second thread is an error naming the owner thread; a forked child never writes
(nor closes) the parent's run. In each case the run read back equals the run that the
completed steps alone would have written."""

from __future__ import annotations

import os
import signal
import threading
import time
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import torchvitals
from torchvitals.collect.activations import ActivationCapture
from torchvitals.collect.reductions import StepReductions
from torchvitals.collect.selection import select_modules
from torchvitals.store.reader import load_run
from torchvitals.store.writer import RunWriter

MANIFEST = {"purpose": "test"}


def wait_or_kill(pid: int, limit: float = 60.0) -> int:
    """The child's exit status; a child still running after ``limit`` seconds is a hang:
    killed, and the test fails naming it."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return status
        time.sleep(0.02)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    raise AssertionError(f"the forked child {pid} hung (over {limit} s): killed")


def test_step_from_a_second_thread_is_an_error_naming_the_owner(tmp_path):
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


def test_a_forward_that_raised_is_discarded_not_merged_into_the_next():
    class Flaky(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.act, self.fc2 = nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)
            self.fail = True

        def forward(self, x):
            h = self.act(self.fc1(x))
            if self.fail:
                self.fail = False
                raise RuntimeError("bad batch")
            return self.fc2(h)

    model = Flaky()
    reductions = StepReductions()
    capture = ActivationCapture(
        model, reductions, act_every=1, grad_every=1, warn_once=lambda *a: None
    )
    model.register_forward_pre_hook(lambda m, a: capture.begin_forward())
    model.register_forward_hook(lambda m, a, o: capture.end_forward())
    for module, spec in select_modules(model):
        module.register_forward_hook(capture.activation_hook(spec))
    with pytest.raises(RuntimeError, match="bad batch"):
        model(torch.randn(3, 4))
    model(torch.randn(3, 4))  # the retry, same step
    (acts,) = reductions.take()
    assert acts.names == ["fc1", "act", "fc2"]  # once each: nothing of the failed forward


def test_a_step_abandoned_in_forward_is_discarded_whole(tmp_path):
    """An exception in the middle of forward (after the first layers recorded their
    activations), caught by the loop, which skips the batch: nothing of the failed
    forward is merged into the next step; the run equals the run of the batches that
    completed a step."""
    gen = torch.Generator().manual_seed(2)
    batches = [torch.randn(5, 4, generator=gen) for _ in range(5)]
    fails = {1, 3}

    def make():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
        return model, torch.optim.SGD(model.parameters(), lr=0.1)

    def train(path, used):
        model, opt = make()
        current = {"i": None}

        def bad_batch(module, args, output):
            if current["i"] in fails:
                raise ValueError(f"bad batch {current['i']}")

        model[1].register_forward_hook(bad_batch)
        with torchvitals.Monitor(model, path, optimizer=opt, act_grads=True) as mon:
            for i in used:
                current["i"] = i
                try:
                    loss = model(batches[i]).pow(2).mean()
                except ValueError:
                    continue
                opt.zero_grad()
                loss.backward()
                opt.step()
                mon.step(loss=loss)
        run = torchvitals.load_run(path)
        df = run.to_pandas("layers").astype({"layer": str, "kind": str})
        return df.set_index(["step", "layer", "kind"]).sort_index(), run

    got, run = train(tmp_path / "run", range(5))
    fails.clear()
    want, _ = train(tmp_path / "reference", [0, 2, 4])
    assert run.closed and run.problems == []
    assert list(got.index) == list(want.index)
    per_step = got.reset_index().groupby(["step", "kind"]).size().unstack()
    assert per_step.index.tolist() == [0, 1, 2] and (per_step["act"] == 3).all()
    for col in ("numel", "sumsq", "max_abs"):
        np.testing.assert_array_equal(got[col], want[col], err_msg=col)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_child_never_writes_or_closes_the_parents_run(tmp_path):
    w = RunWriter(tmp_path / "run", manifest=MANIFEST)
    w.submit("scalars", {"step": 0, "name": "loss", "value": 1.0})
    w.flush()
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: submit, close, and exit normally (atexit runs)
        os.close(read)
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                accepted = w.submit("scalars", {"step": 1, "name": "loss", "value": 2.0})
                w.close()
            said = any("is a fork of" in str(c.message) for c in caught)
            os.write(write, b"ok" if not accepted and said else b"bad")
        finally:
            os._exit(0)
    os.close(write)
    status = wait_or_kill(pid)
    assert os.read(read, 8) == b"ok" and status == 0
    os.close(read)
    w.submit("scalars", {"step": 2, "name": "loss", "value": 3.0})
    w.close()
    run = load_run(tmp_path / "run")
    assert run.scalar("loss")[0].tolist() == [0, 2]
    assert run.manifest["rows_written"]["scalars"] == 2 and run.closed
