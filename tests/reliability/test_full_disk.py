"""A full disk: writing stalls (dropped, counted, warned once naming the segment file),
training never stops, and writing resumes when space returns; the manifest's counts
match what is on disk. Under ``strict=True`` the error reaches the training thread."""

from __future__ import annotations

import errno
import time
import warnings

import pytest
import torch
from torch import nn
from writer_loops import torchvitals_warnings, train

import torchvitals
from torchvitals.store import segments as segments_module
from torchvitals.store.reader import load_run
from torchvitals.store.segments import SegmentFiles
from torchvitals.store.writer import RunWriter

MANIFEST = {"world_size": 1, "config": {"every": 1}}


class FullDisk:
    """The disk as the segment files see it: ``full`` until the test frees it."""

    def __init__(self, monkeypatch):
        self.full = True
        real = segments_module.write_all

        def write_all(fd, data):
            if self.full:
                raise OSError(errno.ENOSPC, "No space left on device")
            return real(fd, data)

        monkeypatch.setattr(segments_module, "write_all", write_all)


def test_full_disk_then_space_returns(tmp_path, monkeypatch):
    """Writing stalls on a full disk (dropped, counted, warned once) and resumes once
    space returns; the manifest's counts match what is on disk."""
    path = str(tmp_path / "run")
    disk = FullDisk(monkeypatch)
    submitted = 0
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        w = RunWriter(path, manifest=MANIFEST, flush_interval=0.01)
        submitted += train(w, 100)
        assert w.write_errors == 1 and w.dropped > 0
        disk.full = False
        deadline = time.monotonic() + 60  # guards against a hang only: back-off is 0.5 s
        while w.rows_written["scalars"] == 0 and time.monotonic() < deadline:
            w.submit("scalars", {"step": submitted, "name": "loss", "value": 0.0})
            submitted += 1
            w.flush()
        w.close()
    msgs = torchvitals_warnings(rec)
    assert len(msgs) == 2, msgs
    assert "scalars.rank0.000000.arrows" in msgs[0] and "No space left on device" in msgs[0]
    assert "resumed" in msgs[1] and path in msgs[1]
    assert w.write_errors == 1 and w.write_retries >= 1
    run = load_run(path)
    steps = run.scalar("loss")[0]
    assert len(steps) + w.dropped == submitted  # every item written or counted
    m = run.manifest
    assert m["rows_written"]["scalars"] == run.scalars.num_rows  # incl. the dropped-count row
    assert m["write_errors"] == 1 and m["dropped_batches"] == w.dropped
    assert m["write_retries"] == w.write_retries


def test_full_disk_strict_raises(tmp_path, monkeypatch):
    FullDisk(monkeypatch)
    path = str(tmp_path / "run")
    w = RunWriter(path, manifest=MANIFEST, strict=True)
    w.submit("scalars", {"step": 0, "name": "loss", "value": 1.0})
    with pytest.raises(OSError) as ei:
        w.flush()
    assert ei.value.errno == errno.ENOSPC
    w.close()  # error already delivered: close does not raise again


def test_enospc_from_sink_monkeypatched(tmp_path, monkeypatch):
    def no_space(self, table, batch):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(SegmentFiles, "write", no_space)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        with RunWriter(str(tmp_path / "run"), manifest=MANIFEST) as w:
            train(w)
    assert len(torchvitals_warnings(rec)) == 1
    assert w.write_errors == 1 and w.dropped == 200

    w = RunWriter(str(tmp_path / "run2"), manifest=MANIFEST, strict=True)
    w.submit("scalars", {"step": 0, "name": "loss", "value": 1.0})
    with pytest.raises(OSError, match="No space left"):
        w.close()


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

        monkeypatch.setattr(segments_module, "write_all", disk_full)
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
