"""The column digests in a compacted segment's footer (compaction.column_digest) are a
file format: the fast computation must give, for every kind of column, exactly the
digest of its definition (here, the straightforward form it was first written in), or
every Parquet file written before would read as damaged."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from torchvitals.store.compaction import column_digest
from torchvitals.store.integrity import nh64


def defined_digest(column: pa.ChunkedArray | pa.Array) -> int:
    """nh64 of: the validity mask (uint8), then for labels the sorted labels used
    (NUL-joined UTF-8) and each row's rank among them (int64), for lists the lengths
    (int64) and the values, else the values; nulls as 0."""
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if pa.types.is_string(arr.type) or pa.types.is_large_string(arr.type):
        arr = arr.dictionary_encode()
    parts = [np.asarray(arr.is_valid().to_numpy(zero_copy_only=False), dtype=np.uint8)]
    if pa.types.is_dictionary(arr.type):
        labels = [str(x) for x in arr.dictionary.to_pylist()]
        codes = pc.fill_null(arr.indices, 0).to_numpy(zero_copy_only=False).astype(np.int64)
        used = sorted({labels[c] for c in np.unique(codes)}) if len(codes) else []
        where = {label: i for i, label in enumerate(used)}
        canon = np.array([where.get(label, -1) for label in labels] or [0], dtype=np.int64)
        parts += [np.frombuffer("\x00".join(used).encode("utf-8", "surrogatepass"), np.uint8)]
        parts.append(canon[codes] if len(codes) else codes)
    elif pa.types.is_list(arr.type):
        lengths = pc.fill_null(pc.list_value_length(arr), 0)
        parts.append(lengths.to_numpy(zero_copy_only=False).astype(np.int64))
        parts.append(pc.fill_null(arr.flatten(), 0).to_numpy(zero_copy_only=False))
    else:
        parts.append(pc.fill_null(arr, 0).to_numpy(zero_copy_only=False))
    return nh64(b"".join(np.ascontiguousarray(p).tobytes() for p in parts))


RNG = np.random.default_rng(0)
LIST = pa.list_(pa.int64())


def labels(idx, names):
    return pa.DictionaryArray.from_arrays(pa.array(idx, pa.int32()), pa.array(names))


COLUMNS = {
    "float64": pa.array(RNG.normal(size=1000)),
    "float64 with nulls": pa.array([1.0, None, 3.0]),
    "nan and -0.0": pa.array([float("nan"), -0.0]),
    "int32": pa.array(RNG.integers(0, 5, 1000), pa.int32()),
    "int8 with nulls": pa.array([1, 2, None], pa.int8()),
    "empty": pa.array([], pa.float64()),
    "empty list": pa.array([], LIST),
    "sliced float64": pa.array(RNG.normal(size=1000)).slice(3, 500),
    "strings": pa.array(["a", "b", None, "a"]),
    "lists with nulls": pa.array([[1, 2], [3], None, []], LIST),
    "list values with nulls": pa.array([[1, None], [3]], LIST),
    "sliced lists": pa.array([[1, 2], [3], [4, 5, 6]], LIST).slice(1),
    "histogram rows": pa.array(RNG.integers(0, 99, (500, 84)).tolist(), LIST),
    "labels sorted": labels([0, 1], ["a", "b"]),
    "labels unsorted": labels([1, 0, 1, 2], ["b", "a", "c"]),
    "labels unused": labels([0, 0, 2], ["a", "b", "c"]),
    "labels with nulls": labels([2, None, 0], ["c", "b", "a"]),
    "labels none used": labels([], ["a"]),
    "labels sliced": pa.array(["x", "y", "x", "z"]).dictionary_encode().slice(2, 1),
    "200 labels": labels(RNG.integers(0, 200, 10000).tolist(), [f"l{i}" for i in range(200)]),
    "labels in chunks": pa.chunked_array([labels([0], ["a", "b"]), labels([1], ["b", "a"])]),
    "one chunk": pa.chunked_array([pa.array([1, 2, 3]).slice(1)]),
    "chunks": pa.chunked_array([pa.array([1, 2]), pa.array([3])]),
    "no chunks": pa.chunked_array([], pa.int64()),
    "list chunks": pa.chunked_array([pa.array([[1], [2, 3]], LIST), pa.array([[4]], LIST)]),
}


@pytest.mark.parametrize("name", list(COLUMNS))
def test_column_digest_is_its_definition(name):
    assert column_digest(COLUMNS[name]) == defined_digest(COLUMNS[name])
