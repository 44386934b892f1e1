"""layout.py: file names of a run directory, the atomic JSON write, and who imports it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from torchvitals.store.layout import (
    MANIFEST_RE,
    SEGMENT_RE,
    manifest_name,
    segment_name,
    write_json_atomic,
)


@pytest.mark.parametrize(("table", "rank", "seg"), [("scalars", 0, 0), ("hist", 12, 1_234_567)])
def test_segment_names_round_trip(table, rank, seg):
    name = segment_name(table, rank, seg)
    m = SEGMENT_RE.match(name)
    assert m and (m["table"], int(m["rank"]), int(m["seg"])) == (table, rank, seg)
    if seg < 10**6:
        assert name.endswith(f".{seg:06d}.arrows")  # six digits: names sort in segment order


def test_manifest_names_round_trip():
    m = MANIFEST_RE.match(manifest_name(7))
    assert m and int(m["rank"]) == 7 and manifest_name(7) == "manifest.rank7.json"


@pytest.mark.parametrize(
    "name",
    [
        "manifest.rank0.json.tmp4242",  # write_json_atomic's temporary file
        "scalars.rank0.000001.arrows.tmp",
        "scalars.rank0.arrows",
        "notes.txt",
    ],
)
def test_other_files_do_not_match(name):
    assert not SEGMENT_RE.match(name) and not MANIFEST_RE.match(name)


def test_write_json_atomic_encodes_user_values(tmp_path):
    path = str(tmp_path / "m.json")

    class Opaque:
        def __str__(self):
            return "opaque!"

    write_json_atomic(
        path,
        {
            "np": np.int64(3),
            "arr": np.arange(3),
            "tensor": torch.tensor([1.5]),
            "tuple": (1, 2),
            "set": {4},
            "path": Path("/a/b"),
            "other": Opaque(),
        },
    )
    with open(path) as f:
        got = json.load(f)
    assert got == {
        "np": 3,
        "arr": [0, 1, 2],
        "tensor": [1.5],
        "tuple": [1, 2],
        "set": [4],
        "path": "/a/b",
        "other": "opaque!",
    }
    assert os.listdir(tmp_path) == ["m.json"]  # no temporary file left behind


def test_write_json_atomic_failure_keeps_the_old_file(tmp_path):
    path = str(tmp_path / "m.json")
    write_json_atomic(path, {"old": 1})
    with pytest.raises(TypeError):
        write_json_atomic(path, {1: "a", "b": 2})  # sort_keys cannot order int and str keys
    with open(path) as f:
        assert json.load(f) == {"old": 1}
    assert os.listdir(tmp_path) == ["m.json"]


def test_reader_side_does_not_import_the_writer():
    """Reading a run needs the layout, never the writer (nor its parts)."""
    code = (
        "import importlib.util, sys, types\n"
        "spec = importlib.util.find_spec('torchvitals')\n"
        "pkg = types.ModuleType('torchvitals')\n"  # skip torchvitals/__init__: it imports all
        "pkg.__path__ = list(spec.submodule_search_locations)\n"
        "sys.modules['torchvitals'] = pkg\n"
        "import torchvitals.store.reader, torchvitals.store.merge\n"
        "print(' '.join(sorted(m for m in sys.modules if m.startswith('torchvitals.store'))))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    ).stdout.split()
    assert "torchvitals.store.layout" in out and "torchvitals.store.reader" in out
    writer_side = {"writer", "segments", "submit_queue", "faults", "manifest", "table_builder"}
    assert not {f"torchvitals.store.{m}" for m in writer_side} & set(out), out
