"""The checksums of a compacted segment's own bytes (store/parquet_seal.py): every byte of
the file is covered, a damaged row group is skipped alone, the rest read back exactly,
and a footer without checksums (or with a wrong one) is refused, naming the file."""

from __future__ import annotations

import itertools

import numpy as np
import pyarrow.parquet as pq
import pytest
from test_compaction import compact_layers, random_batches, write_segments

from torchvitals.store import parquet_seal
from torchvitals.store.reader import read_segment_file


@pytest.fixture(scope="module")
def multi_group(tmp_path_factory):
    """A compacted layers segment of several row groups, and its rows."""
    path = tmp_path_factory.mktemp("seal")
    write_segments(path, random_batches(np.random.default_rng(3), 120, per_step=40), False)
    compacted = compact_layers(path, row_group_bytes=40_000)
    rows, rec = read_segment_file(compacted)
    assert rec is None
    return compacted, rows


def group_bounds(path) -> list[tuple[int, int]]:
    data = path.read_bytes()
    meta = pq.read_metadata(path)
    footer_start = len(data) - 8 - int.from_bytes(data[-8:-4], "little")
    return parquet_seal._group_bounds(meta, footer_start)


def test_groups_tile_the_file_up_to_the_footer(multi_group):
    path, _rows = multi_group
    bounds = group_bounds(path)
    assert len(bounds) > 3 and bounds[0][0] == 0
    assert all(a[1] == b[0] for a, b in itertools.pairwise(bounds))
    data = path.read_bytes()
    assert bounds[-1][1] == len(data) - 8 - int.from_bytes(data[-8:-4], "little")


@pytest.mark.parametrize("where", ["first byte", "middle", "last byte"])
def test_a_damaged_row_group_is_skipped_alone(tmp_path, multi_group, where):
    path, rows = multi_group
    bounds = group_bounds(path)
    meta = pq.read_metadata(path)
    for g, (begin, end) in enumerate(bounds):
        offset = {"first byte": begin, "middle": (begin + end) // 2, "last byte": end - 1}[where]
        data = bytearray(path.read_bytes())
        data[offset] ^= 0x10
        damaged = tmp_path / path.name
        damaged.write_bytes(bytes(data))
        got, rec = read_segment_file(damaged)
        assert rec is not None and len(rec.damage) == 1, (g, offset)
        assert f"row group {g} skipped" in rec.damage[0].error
        before = sum(meta.row_group(i).num_rows for i in range(g))
        lost = meta.row_group(g).num_rows
        expected = rows.slice(0, before).to_pylist() + rows.slice(before + lost).to_pylist()
        assert got.to_pylist() == expected


def test_every_footer_byte_is_covered(tmp_path, multi_group):
    path, _rows = multi_group
    data = path.read_bytes()
    footer_start = len(data) - 8 - int.from_bytes(data[-8:-4], "little")
    damaged = tmp_path / path.name
    # (tests/reliability's corruption sweep flips every byte of a footer; here a sample)
    offsets = np.linspace(footer_start, len(data) - 9, 48).astype(int).tolist()
    for offset in [*offsets, *range(len(data) - 8, len(data))]:
        flipped = bytearray(data)
        flipped[offset] ^= 0x01
        damaged.write_bytes(bytes(flipped))
        got, rec = read_segment_file(damaged)
        assert rec is not None and rec.file == str(damaged), offset
        assert got.num_rows == 0, offset


def test_a_footer_without_checksums_is_refused(tmp_path, multi_group):
    path, rows = multi_group
    plain = tmp_path / path.name
    pq.write_table(rows, plain)  # what a file not sealed by the compaction looks like
    got, rec = read_segment_file(plain)
    assert got.num_rows == 0 and "no checksums" in rec.damage[0].error
