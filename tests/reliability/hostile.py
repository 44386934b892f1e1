"""Hostile run directories: each scenario changes a copy of the template run and says
which file a clear message must name. Shared by the worker and the tests."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

MANIFEST = "manifest.rank0.json"


def _edit_manifest(run: Path, change) -> str:
    p = run / MANIFEST
    m = json.loads(p.read_text())
    change(m)  # the checksum is left as it was: it no longer matches
    p.unlink()
    p.write_text(json.dumps(m))
    return MANIFEST


def _set(key, value):
    return lambda m: m.__setitem__(key, value)


def _dist(value):
    return lambda m: m.__setitem__("distributed", value)


def fifo_manifest(run: Path) -> str:
    (run / MANIFEST).unlink()
    os.mkfifo(run / MANIFEST)
    return MANIFEST


def dev_zero_manifest(run: Path) -> str:
    (run / MANIFEST).unlink()
    (run / MANIFEST).symlink_to("/dev/zero")
    return MANIFEST


def directory_manifest(run: Path) -> str:
    (run / MANIFEST).unlink()
    (run / MANIFEST).mkdir()
    return MANIFEST


def fifo_segment(run: Path) -> str:
    name = "layers.rank0.000001.arrows"
    os.mkfifo(run / name)
    return name


def huge_rank_segment(run: Path) -> str:
    name = "scalars.rank2147483648.000000.arrows"
    shutil.copy(run / "scalars.rank0.000000.arrows", run / name)
    return name


def copy_short_number(run: Path) -> str:
    name = "scalars.rank0.0.arrows"
    shutil.copy(run / "scalars.rank0.000000.arrows", run / name)
    return name


def copy_padded_rank(run: Path) -> str:
    name = "scalars.rank00.000000.arrows"
    shutil.copy(run / "scalars.rank0.000000.arrows", run / name)
    return name


def copy_padded_manifest(run: Path) -> str:
    name = "manifest.rank00.json"
    shutil.copy(run / MANIFEST, run / name)
    return name


def copy_next_number(run: Path) -> str:
    name = "hist.rank0.000001.arrows"
    shutil.copy(run / "hist.rank0.000000.arrows", run / name)
    return name


def link_next_number(run: Path) -> str:
    name = "layers.rank0.000001.arrows"
    (run / name).symlink_to(run / "layers.rank0.000000.arrows")
    return name


def deep_json(run: Path) -> str:
    (run / MANIFEST).write_text("[" * 100_000 + "]" * 100_000)
    return MANIFEST


def long_int(run: Path) -> str:
    (run / MANIFEST).write_text('{"schema_version": ' + "9" * 100_000 + "}")
    return MANIFEST


SCENARIOS = {
    "fifo_manifest": fifo_manifest,
    "dev_zero_manifest": dev_zero_manifest,
    "directory_manifest": directory_manifest,
    "fifo_segment": fifo_segment,
    "rank_2147483648_segment": huge_rank_segment,
    "copy_scalars.rank0.0": copy_short_number,
    "copy_scalars.rank00": copy_padded_rank,
    "copy_manifest.rank00": copy_padded_manifest,
    "copy_as_next_segment": copy_next_number,
    "link_as_next_segment": link_next_number,
    "deeply_nested_json": deep_json,
    "100000_digit_int": long_int,
    "world_size_1000000": lambda r: _edit_manifest(r, _set("world_size", 1_000_000)),
    "world_size_2**40": lambda r: _edit_manifest(r, _set("world_size", 2**40)),
    "world_size_0": lambda r: _edit_manifest(r, _set("world_size", 0)),
    "world_size_true": lambda r: _edit_manifest(r, _set("world_size", True)),
    "world_size_string": lambda r: _edit_manifest(r, _set("world_size", "8")),
    "rank_mismatch": lambda r: _edit_manifest(r, _set("rank", 3)),
    "schema_version_0": lambda r: _edit_manifest(r, _set("schema_version", 0)),
    "schema_version_float": lambda r: _edit_manifest(r, _set("schema_version", 1.0)),
    "distributed_list": lambda r: _edit_manifest(r, _dist([1, 2])),
    "distributed_string": lambda r: _edit_manifest(r, _dist("ddp")),
    "sharded_list": lambda r: _edit_manifest(r, _dist({"sharded": ["fc1"]})),
    "sharded_entry_int": lambda r: _edit_manifest(r, _dist({"sharded": {"fc1": 7}})),
    "recorded_by_string": lambda r: _edit_manifest(
        r, _dist({"sharded": {"fc1": {"recorded_by": "0"}}})
    ),
    "recorded_by_huge_rank": lambda r: _edit_manifest(
        r, _dist({"sharded": {"fc1": {"recorded_by": [0, 2**36]}}})
    ),
    "recorded_by_negative": lambda r: _edit_manifest(
        r, _dist({"sharded": {"fc1": {"recorded_by": [-1]}}})
    ),
    # schema version 3: mesh and placements per parameter, the recording ranks derived
    "mesh_shape_2**40": lambda r: _edit_manifest(r, _dist({"meshes": [{"shape": [2**20, 2**20]}]})),
    "mesh_first_rank_huge": lambda r: _edit_manifest(
        r, _dist({"meshes": [{"shape": [8], "first_rank": 2**40}]})
    ),
    "mesh_ranks_ragged": lambda r: _edit_manifest(
        r, _dist({"meshes": [{"shape": [2, 2], "ranks": [[0, 1], [2]]}]})
    ),
    "mesh_index_out_of_range": lambda r: _edit_manifest(
        r, _dist({"meshes": [], "sharded": {"fc1": {"mesh": 3, "placements": []}}})
    ),
    "placements_string": lambda r: _edit_manifest(
        r, _dist({"sharded": {"fc1": {"placements": "Shard(dim=0)"}}})
    ),
    # schema version 3: the attempts of a run resumed in its directory
    "attempts_string": lambda r: _edit_manifest(r, _set("attempts", "0,1")),
    "attempts_empty": lambda r: _edit_manifest(r, _set("attempts", [])),
    "attempt_out_of_range": lambda r: _edit_manifest(r, _set("attempt", 5)),
    "start_step_string": lambda r: _edit_manifest(r, _set("attempts", [{"start_step": "0"}])),
    "start_step_2**70": lambda r: _edit_manifest(r, _set("attempts", [{"start_step": 2**70}])),
    "attempt_rows_written_negative": lambda r: _edit_manifest(
        r, _set("attempts", [{"start_step": 0, "rows_written": {"scalars": -1}}])
    ),
    "grads_on_list": lambda r: _edit_manifest(r, _dist({"grads_on": ["rank0"]})),
    "rows_written_string": lambda r: _edit_manifest(r, _set("rows_written", "lots")),
    "rows_written_negative": lambda r: _edit_manifest(r, _set("rows_written", {"hist": -1})),
    "closed_at_number": lambda r: _edit_manifest(r, _set("closed_at", 5)),
    "edited_value": lambda r: _edit_manifest(r, _set("device", "cuda:7")),
}
