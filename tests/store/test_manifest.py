"""ManifestFile: the caller's keys plus the writer's, at start and at close."""

from __future__ import annotations

import json

import numpy as np
import pytest

from torchvitals.store.layout import manifest_checksum
from torchvitals.store.manifest import ManifestFile
from torchvitals.store.manifest_check import check_manifest
from torchvitals.store.schema import SCHEMA_VERSION


def read(path):
    with open(path) as f:
        return json.load(f)


def test_start_and_closed_manifest(tmp_path):
    m = ManifestFile(
        str(tmp_path),
        3,
        {"config": {"lr": np.float32(0.5)}, "rank": 99, "started_at": "T0"},
        settings={"flush_interval": 1.0},
    )
    assert m.path == str(tmp_path / "manifest.rank3.json")
    m.write_start()
    start = read(m.path)
    assert start.pop("checksum") == manifest_checksum(start)  # of everything else
    assert start == {
        "config": {"lr": 0.5},
        "rank": 3,  # the writer's rank wins
        "schema_version": SCHEMA_VERSION,
        "started_at": "T0",  # kept when the caller gives one
        "writer": {"flush_interval": 1.0},
    }
    m.write_closed(dropped=2, write_errors=1, rows_written={"scalars": 5})
    closed = read(m.path)
    assert closed.pop("checksum") == manifest_checksum(closed)
    keys = ("dropped_batches", "write_errors", "rows_written", "rows_lost", "write_retries")
    assert {k: closed.pop(k) for k in (*keys, "run_dir_lost", "first_segment")} == {
        "dropped_batches": 2,
        "write_errors": 1,
        "rows_written": {"scalars": 5},
        "rows_lost": {},
        "write_retries": 0,
        "run_dir_lost": 0,
        "first_segment": {},
    }
    assert isinstance(closed.pop("closed_at"), str) and closed == start


def test_started_at_defaults_to_now(tmp_path):
    m = ManifestFile(str(tmp_path), 0, {}, settings={})
    m.write_start()
    assert read(m.path)["started_at"].endswith("+00:00")


def _check(distributed: dict) -> dict:
    text = json.dumps({"schema_version": SCHEMA_VERSION, "distributed": distributed}).encode()
    return check_manifest(text, "m.json", 0)[0]


@pytest.mark.parametrize(
    ("distributed", "match"),
    [
        ({"meshes": {"shape": [2]}}, "'distributed.meshes' must be a list"),
        ({"meshes": [{"shape": [2**11, 2**11]}]}, r"meshes\[0\]'.shape must be"),
        ({"meshes": [{"shape": [0]}]}, r"meshes\[0\]'.shape must be"),
        ({"meshes": [{"shape": [4], "first_rank": 2**20 - 2}]}, "first_rank must be a rank"),
        ({"meshes": [{"shape": [2], "first_rank": -1}]}, "first_rank must be a rank"),
        ({"meshes": [{"shape": [2, 2], "ranks": [[0, 1], [2]]}]}, "nested lists of ranks"),
        ({"meshes": [{"shape": [2], "ranks": [0, 2**40]}]}, r"'.ranks holds 1099511627776"),
        ({"sharded": {"w": {"mesh": 0}}}, r"sharded\['w'\]'.mesh is 0, not an index"),
        (
            {"meshes": [{"shape": [2], "first_rank": 0}], "sharded": {"w": {"mesh": 1}}},
            "not an index into 'meshes'",
        ),
        ({"sharded": {"w": {"placements": "Shard(0)"}}}, "placements must be a list"),
    ],
)
def test_sharding_layout_limits_are_named(distributed, match):
    with pytest.raises(ValueError, match=match) as ei:
        _check(distributed)
    assert "m.json" in str(ei.value)


def test_sharding_layout_of_both_versions_is_accepted():
    mesh = {"shape": [2, 2], "ranks": [[3, 1], [7, 5]], "coordinate": [0, 1]}
    entry = {"mesh": 1, "placements": ["Replicate()", "Shard(dim=0)"], "local_shape": [4]}
    new = {"meshes": [{"shape": [8], "first_rank": 0}, mesh], "sharded": {"w": entry}}
    assert _check(new)["distributed"] == new
    old = {"sharded": {"w": {"recorded_by": [0, 1]}}}
    assert _check(old)["distributed"] == old
