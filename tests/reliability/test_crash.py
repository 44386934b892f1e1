"""Crash safety: SIGKILL at random moments loses at most the unflushed tail (the writer
alone, and a training process with a Monitor); atexit flushes."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import textwrap
import threading
import time
import warnings

import numpy as np

import torchvitals
from torchvitals.store.reader import load_run

CHILD = os.path.join(os.path.dirname(os.path.abspath(__file__)), "crash_writer_child.py")
TRIALS = 3


def _spawn(path, mode):
    return subprocess.Popen(
        [sys.executable, CHILD, str(path), mode],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _kill_at_random(proc, delay, lines):
    """Collect stdout lines; SIGKILL ``delay`` seconds after the child's first flush."""
    ready = threading.Event()

    def reader():
        for line in proc.stdout:
            lines.append(line.strip())
            if line.startswith("ready"):
                ready.set()

    t = threading.Thread(target=reader, daemon=True)
    t.start()
    assert ready.wait(60), proc.stderr.read()
    time.sleep(delay)
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    t.join(10)


def _check_run(path, last_flushed):
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        run = load_run(path)  # never raises on a truncated tail
    assert not run.closed and "closed_at" not in run.manifest
    # a warning per damaged segment, naming it and the number of batches recovered
    msgs = [str(r.message) for r in rec if "torchvitals" in str(r.message)]
    assert len(msgs) == len(run.recovery)
    for rec_, msg in zip(run.recovery, msgs, strict=True):
        assert rec_.file in msg and f"recovered {rec_.batches} complete record batch" in msg
    # every flushed step is there, and what is there is a correct prefix per table
    steps, values = run.scalar("loss")
    assert steps.tolist() == list(range(len(steps))) and np.array_equal(values, steps)
    assert len(steps) > last_flushed
    layers = run.layers
    lsteps = layers["step"].to_numpy()
    n_layer_steps = len(lsteps) // 16
    assert len(lsteps) % 16 == 0 and n_layer_steps > last_flushed
    assert np.array_equal(lsteps, np.repeat(np.arange(n_layer_steps), 16))
    assert np.array_equal(layers["numel"].to_numpy(), lsteps)
    hist = run.hist
    hsteps = hist["step"].to_numpy()
    assert len(hsteps) % 16 == 0 and len(hsteps) // 16 > last_flushed
    counts = np.stack(hist["counts"].to_numpy(zero_copy_only=False))
    assert counts.shape == (len(hsteps), 64) and np.array_equal(counts[:, 0], hsteps)
    return run


def test_sigkill_at_random_moments(tmp_path):
    rng = random.Random(1234)  # deterministic kill delays
    delays = [rng.uniform(0.0, 0.5) for _ in range(TRIALS)]
    procs, lines = [], []
    for i in range(TRIALS):  # start all children first: they import in parallel
        procs.append(_spawn(tmp_path / f"run{i}", "loop"))
        lines.append([])
    for proc, delay, out in zip(procs, delays, lines, strict=True):
        _kill_at_random(proc, delay, out)
        assert proc.returncode == -signal.SIGKILL
    for i, out in enumerate(lines):
        flushed = [int(x.split()[1]) for x in out if x.startswith("flushed")]
        run = _check_run(tmp_path / f"run{i}", flushed[-1] if flushed else -1)
        print(f"trial {i}: killed after step {flushed[-1]}, recovery: {run.recovery}")
        assert len(os.listdir(tmp_path / f"run{i}")) > 3  # segments rotated (64 KiB)
        assert run.ranks == [0]


def test_normal_exit_without_close_is_flushed_by_atexit(tmp_path):
    path = tmp_path / "run"
    proc = _spawn(path, "exit")
    _out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no truncated segment: every stream was closed
        run = load_run(path)
    assert run.closed and run.recovery == []
    assert run.scalar("loss")[0].tolist() == list(range(100))
    assert run.layers.num_rows == 1600 and run.hist.num_rows == 1600
    assert run.manifest["rows_written"] == {"scalars": 100, "layers": 1600, "hist": 1600}


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
