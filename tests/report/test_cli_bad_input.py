"""Every command that reads a run, on what is not a good run: a missing path, a directory
that is not a run, a file, a run with no data, a run with one corrupted segment, a run
still being written. Either one line naming the file and exit status 2, or the report of
what could be read with a ``note:`` line per problem; never a traceback."""

from __future__ import annotations

import numpy as np
import pytest

from torchvitals.cli import main
from torchvitals.engine.histogram import NUM_BINS
from torchvitals.store.writer import RunWriter

LAYERS = ["fc1", "relu", "fc2"]


def write_steps(w: RunWriter, rng, steps: range) -> None:
    for step in steps:
        loss = 2.0 * np.exp(-step / 50) + 0.05 * rng.random()
        w.submit("scalars", {"step": step, "name": ["loss", "lr/group0"], "value": [loss, 0.1]})
        sumsq = rng.random(3) + 0.1
        w.submit(
            "layers",
            {"step": step, "layer": LAYERS, "kind": "grad", "numel": 64, "nan": 0, "inf": 0,
             "zeros": 0, "sum": 0.0, "sumsq": sumsq, "max_abs": np.sqrt(sumsq)},
        )  # fmt: skip
        counts = rng.integers(0, 20, size=(3, NUM_BINS))
        w.submit("hist", {"step": step, "layer": LAYERS, "kind": "grad", "counts": counts})


def good_run(path, steps: int = 120, **kw) -> RunWriter:
    w = RunWriter(path, manifest={"world_size": 1}, on_full="block", **kw)
    write_steps(w, np.random.default_rng(), range(steps))
    return w


@pytest.fixture(scope="module")
def baseline(tmp_path_factory):
    path = tmp_path_factory.mktemp("good") / "run"
    good_run(path).close()
    return path


def commands(path, baseline, tmp_path) -> dict[str, list[str]]:
    watched = str(tmp_path / "w.html")
    return {
        "report": ["report", str(path), "--out", str(tmp_path / "r.html")],
        "events": ["events", str(path)],
        "compare": ["compare", str(baseline), str(path), "--out", str(tmp_path / "c.html")],
        "export tensorboard": ["export", "tensorboard", str(path), str(tmp_path / "tb")],
        "report --watch": ["report", str(path), "--watch", "--interval", "0", "--out", watched],
    }


COMMANDS = ["report", "events", "compare", "export tensorboard", "report --watch"]


def make_bad(kind: str, tmp_path):
    path = tmp_path / "bad"
    if kind == "missing":
        return path, "run directory not found"
    if kind == "a file":
        path.write_text("hello")
        return path, "not a directory"
    if kind == "not a run":
        path.mkdir()
        (path / "notes.txt").write_text("hello")
        return path, "no manifest.rank*.json"
    if kind == "no data":
        RunWriter(path, manifest={"world_size": 1}).close()
        return path, "no data recorded yet"
    raise AssertionError(kind)


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("kind", ["missing", "a file", "not a run", "no data"])
def test_what_is_not_a_run_is_one_line_naming_it(kind, command, baseline, tmp_path, capsys):
    if command == "export tensorboard":
        pytest.importorskip("tensorboard")
    path, why = make_bad(kind, tmp_path)
    assert main(commands(path, baseline, tmp_path)[command]) == 2
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert "Traceback" not in captured.err + captured.out
    assert len(err) == 1, err
    assert err[0].startswith(f"torchvitals {command.split(' --')[0]}: ")
    assert str(path) in err[0] and why in err[0], err[0]


@pytest.mark.parametrize("command", COMMANDS)
def test_a_corrupted_segment_is_read_around_with_a_note_naming_it(
    command, baseline, tmp_path, capsys
):
    pytest.importorskip("matplotlib")
    if command == "export tensorboard":
        pytest.importorskip("tensorboard")
    path = tmp_path / "run"
    good_run(path).close()
    victim = max(
        (p for p in path.iterdir() if p.name.startswith("layers.")), key=lambda p: p.stat().st_size
    )
    data = bytearray(victim.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 16] = bytes(b ^ 0xFF for b in data[middle : middle + 16])
    victim.write_bytes(bytes(data))
    assert main(commands(path, baseline, tmp_path)[command]) == 0
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err + captured.out
    err = captured.err.strip().splitlines()
    assert err and all(line.startswith("torchvitals ") and " note: " in line for line in err)
    assert any(str(victim) in line for line in err), err


@pytest.mark.parametrize("command", [c for c in COMMANDS if c != "report --watch"])
def test_a_run_still_being_written_is_reported_with_a_note(command, baseline, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    if command == "export tensorboard":
        pytest.importorskip("tensorboard")
    path = tmp_path / "run"
    writer = good_run(path)
    try:
        writer.flush()
        assert main(commands(path, baseline, tmp_path)[command]) == 0
    finally:
        writer.close()
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err + captured.out
    (line,) = captured.err.strip().splitlines()
    assert line == (
        f"torchvitals {command}: note: {path} is not closed (still being written, or its "
        "process died): showing what is on disk"
    )
