"""``torchvitals report --watch``: a run written by a child process, step by step, watched
until it closes; and the incremental reading on its own, file cut at random bytes."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from torchvitals.cli import build_parser, main
from torchvitals.report.watch import RunWatcher, watch
from torchvitals.store.reader import load_run

# Writes `n` steps of every table when it reads a line "n" on stdin, flushes, says "ok";
# "close" closes the run.
CHILD = r"""
import sys
import numpy as np
from torchvitals.engine.histogram import NUM_BINS
from torchvitals.store.writer import RunWriter

rng = np.random.default_rng(int(sys.argv[2]))
names = ["fc1", "relu", "fc2"]
manifest = {"world_size": 1, "layers": [{"name": n} for n in names]}
w = RunWriter(sys.argv[1], manifest=manifest, flush_interval=3600, on_full="block")
step = 0
for line in sys.stdin:
    if line.strip() == "close":
        w.close()
        print("ok", flush=True)
        break
    for _ in range(int(line)):
        loss = 2.0 * np.exp(-step / 100) + 0.1 * rng.random()
        w.submit("scalars", {"step": step, "name": ["loss", "lr/group0"], "value": [loss, 0.1]})
        sumsq = rng.random(3) + 0.1
        w.submit("layers", {"step": step, "layer": names, "kind": "grad", "numel": 640,
                            "nan": 0, "inf": 0, "zeros": 0, "sum": rng.normal(size=3),
                            "sumsq": sumsq, "max_abs": np.sqrt(sumsq)})
        w.submit("layers", {"step": step, "layer": "relu", "kind": "act", "numel": 640,
                            "nan": 0, "inf": 0, "zeros": 100, "units": 64,
                            "dead_units": int(step > 60) * 20, "sum": 1.0, "sumsq": 2.0,
                            "max_abs": 1.0})
        counts = rng.integers(0, 50, size=(3, NUM_BINS))
        w.submit("hist", {"step": step, "layer": names, "kind": "grad", "counts": counts})
        step += 1
    w.flush()
    print("ok", flush=True)
"""


class Child:
    def __init__(self, path: Path):
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
        seed = str(np.random.default_rng().integers(1 << 30))
        self.proc = subprocess.Popen(
            [sys.executable, "-c", CHILD, str(path), seed],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )

    def send(self, command: str) -> None:
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        assert self.proc.stdout.readline().strip() == "ok"

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=30)


def segment_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.glob("*.arrows"))


def test_watch_re_renders_as_the_run_grows_and_ends_with_the_report(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    path, out = tmp_path / "run", tmp_path / "watched.html"
    child = Child(path)
    try:
        child.send("40")
        commands = iter(["40", "80", "40", "close"])
        reads, sizes, pages = [], [], []

        def on_refresh(refresh):
            reads.append(refresh.bytes_read)
            sizes.append(segment_bytes(path))
            pages.append(hashlib.sha256(out.read_bytes()).hexdigest() if out.exists() else None)
            command = next(commands, None)
            if command is not None:
                child.send(command)

        args = build_parser().parse_args(
            ["report", str(path), "--watch", "--interval", "0", "--out", str(out)]
        )
        assert watch(args, on_refresh=on_refresh, sleep=lambda _: None) == 0
    finally:
        child.close()
    assert len(reads) == 5
    # Rendered at each of the four refreshes of the growing run, each time a new page.
    assert None not in pages[:4] and len(set(pages[:4])) == 4
    status = [line for line in capsys.readouterr().out.splitlines() if " step " in line]
    assert len(status) == 4 and status[-1].split(" step ")[1].startswith("199 loss ")

    # Bytes read follow what is new (40, 40, 80, 40 steps), not the size of the run.
    per_step = reads[1] / 40
    assert reads[2] / 80 == pytest.approx(per_step, rel=0.3)
    assert reads[3] / 40 == pytest.approx(per_step, rel=0.3)
    assert sizes[3] >= 4 * reads[3]  # the last refresh of the live run read a fifth of it

    # The last page is the one `torchvitals report` writes of the closed run.
    fresh = tmp_path / "fresh.html"
    assert main(["report", str(path), "--out", str(fresh)]) == 0
    assert out.read_bytes() == fresh.read_bytes()


def sorted_rows(table: pa.Table) -> list:
    rows = table.cast(
        pa.schema(
            pa.field(f.name, pa.string()) if pa.types.is_dictionary(f.type) else f
            for f in table.schema
        )
    ).to_pylist()
    return rows


def test_incremental_reading_of_files_cut_at_random_bytes(tmp_path):
    """A live run's stream segments copied a few random bytes at a time: every refresh
    returns exactly the complete batches so far; nothing is read twice."""
    source = tmp_path / "source"
    child = Child(source)
    try:
        for _ in range(3):
            child.send("30")
        live = {p.name: p.read_bytes() for p in source.glob("*.arrows")}
    finally:
        child.close()  # killed: the streams stay as they were (never compacted)
    expected = load_run(source)
    copy = tmp_path / "copy"
    copy.mkdir()
    for manifest in source.glob("manifest.*.json"):
        shutil.copy(manifest, copy / manifest.name)
    watcher = RunWatcher(copy)
    rng = np.random.default_rng()
    written = dict.fromkeys(live, 0)
    rows_seen = 0
    while any(written[name] < len(data) for name, data in live.items()):
        for name, data in live.items():
            cut = min(len(data), written[name] + int(rng.integers(1, 3000)))
            with open(copy / name, "ab") as f:
                f.write(data[written[name] : cut])
            written[name] = cut
        run = watcher.refresh().run
        assert not run.problems  # a message cut short is waited for, not damage
        rows = sum(t.num_rows for t in run.tables.values())
        assert rows >= rows_seen
        rows_seen = rows
    assert watcher.bytes_read == sum(len(d) for d in live.values())  # each byte read once
    assert watcher.refresh().bytes_read == 0
    for table in ("scalars", "layers", "hist"):
        assert sorted_rows(run.tables[table]) == sorted_rows(expected.tables[table])


def test_ctrl_c_stops_watching_a_live_run_and_names_the_last_report(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    path, out = tmp_path / "run", tmp_path / "watched.html"
    child = Child(path)
    try:
        child.send("30")

        def interrupted(_seconds):
            raise KeyboardInterrupt

        args = build_parser().parse_args(["report", str(path), "--watch", "--out", str(out)])
        assert watch(args, sleep=interrupted) == 0
    finally:
        child.close()
    lines = capsys.readouterr().out.splitlines()
    assert "".join(lines[-2:]).replace(" ", "").endswith(f"lastreport:{out}".replace(" ", ""))
    assert "<html" in out.read_text(encoding="utf-8")
