"""The checksums of a compacted segment's own bytes (store/parquet_seal.py): every byte of
the file is covered, a damaged row group is skipped alone, the rest read back exactly,
and a footer without checksums (or with a wrong one) is refused, naming the file."""

from __future__ import annotations

import io
import itertools

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from test_compaction import compact_layers, random_batches, write_segments

from torchvitals.store import compaction, parquet_seal
from torchvitals.store.integrity import nh64
from torchvitals.store.reader import read_segment_file
from torchvitals.store.writer import RunWriter


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


def test_two_flipped_top_bits_in_a_block_are_caught(tmp_path, multi_group):
    # nh64 alone cannot see them (k * 2**63 is 2**63 mod 2**64 for any odd key k): the
    # CRC-32 beside it must.
    path, _rows = multi_group
    begin, end = group_bounds(path)[1]
    data = path.read_bytes()
    damaged = tmp_path / path.name
    rng = np.random.default_rng(0)
    words = (end - begin) // 8
    for k in rng.choice(words - 200, 20, replace=False):
        first = begin + 8 * int(k) + 7
        flipped = bytearray(data)
        flipped[first] ^= 0x80
        flipped[first + 8 * int(rng.integers(1, 200))] ^= 0x80
        assert nh64(flipped[begin:end]) == nh64(data[begin:end])
        damaged.write_bytes(bytes(flipped))
        _got, rec = read_segment_file(damaged)
        assert rec is not None and "row group 1 skipped" in rec.damage[0].error


def test_a_damaged_version_is_damage_not_a_newer_version(tmp_path):
    with RunWriter(tmp_path, manifest={"world_size": 1}, on_full="block") as w:
        w.submit("layers", {"step": 0, "layer": ["a"], "kind": "grad", "sum": [1.0]})
    path = tmp_path / "layers.rank0.000000.parquet"
    data = bytearray(path.read_bytes())
    at = data.rfind(b"torchvitals.schema_version") + len(b"torchvitals.schema_version") + 2
    assert data[at : at + 1] == b"3"
    data[at] ^= 0x04  # "7"
    path.write_bytes(bytes(data))
    got, rec = read_segment_file(path)
    assert got.num_rows == 0 and "footer checksum mismatch" in rec.damage[0].error


@pytest.mark.parametrize("name", ["torchvitals.footer_checksum", "m.torchvitals.group_checksums"])
def test_a_layer_named_like_a_checksum_key_is_compacted(tmp_path, name):
    # The name is in the row group's statistics, so in the footer, beside the key itself.
    with RunWriter(tmp_path, manifest={"world_size": 1}, on_full="block") as w:
        w.submit("layers", {"step": 0, "layer": [name], "kind": "grad", "sum": [1.0]})
    got, rec = read_segment_file(tmp_path / "layers.rank0.000000.parquet")
    assert rec is None and got["layer"].to_pylist() == [name]


def test_empty_batches_and_empty_streams_are_compacted(tmp_path):
    with RunWriter(tmp_path / "empty", manifest={"world_size": 1}, on_full="block"):
        pass
    some = random_batches(np.random.default_rng(1), 8)
    batches = [some[0].slice(0, 0), *some]
    write_segments(tmp_path / "some", batches, compact=False)
    got, rec = read_segment_file(compact_layers(tmp_path / "some"))
    assert rec is None and got.num_rows == sum(b.num_rows for b in batches[1:])


@pytest.mark.parametrize("kind", ["bytes", "pyarrow buffer", "BytesIO", "file"])
def test_every_kind_of_source_is_read(multi_group, kind):
    path, rows = multi_group
    data = path.read_bytes()
    source = {
        "bytes": lambda: data,
        "pyarrow buffer": lambda: pa.py_buffer(data),
        "BytesIO": lambda: io.BytesIO(data),
        "file": lambda: open(path, "rb"),  # noqa: SIM115
    }[kind]()
    got = list(compaction.parquet_row_groups(source, "layers", str(path)))
    assert all(damage is None for _rows, damage in got)
    assert pa.concat_tables([r for r, _ in got]).equals(rows)
