"""Arrow schemas of a torchvitals run directory: the single source of truth.

``docs/schema.md`` describes the same tables in prose; the writer (``writer.py``)
builds every record batch with these schemas and the reader (``reader.py``) conforms
every segment it reads to them.

Versioning: ``SCHEMA_VERSION`` is an integer bumped on *any* change to a table
(column added, removed, retyped) or to the meaning of a manifest key. Readers
accept runs with ``schema_version <= SCHEMA_VERSION`` (columns a run lacks are
read back as nulls) and refuse newer runs with a clear error.

History: 2 added ``layers.large`` and writes ``dead_units``, ``saturated`` and
``saturated_units`` as null where the module does not measure them (version 1 wrote 0,
and counted |x| >= 6 on linear layers as ``saturated``). 3: attempt, shards_complete (and
hist.neg_counts): every table's ``attempt`` (a run resumed in its directory; null in
older runs, read as the first attempt) with the manifest's ``attempts``;
``shards_complete`` in ``layers`` and ``hist``; the manifest's sharding layout without
``recorded_by``.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from torchvitals.engine.contract import COUNT_KEYS, MOMENT_KEYS

__all__ = [
    "DICT_STRING",
    "DROPPED_SCALAR",
    "HIST",
    "HOOK_TIME_SCALAR",
    "LAYERS",
    "LAYER_STATS",
    "REQUIRED",
    "SCALARS",
    "SCHEMAS",
    "SCHEMA_VERSION",
    "TABLES",
    "conform",
    "dictionary_codes",
    "empty_table",
    "schema_for",
]

#: Version of the on-disk layout (tables, columns, manifest keys).
SCHEMA_VERSION = 3

#: Dictionary-encoded string, used for low-cardinality labels (names, layers, kinds).
DICT_STRING = pa.dictionary(pa.int32(), pa.string())

#: Name of the scalar the writer records when it had to drop queued batches.
DROPPED_SCALAR = "torchvitals/dropped"

#: Name of the scalar with the seconds the training thread spent in torchvitals per step.
HOOK_TIME_SCALAR = "torchvitals/hook_time"


def _meta(table: str) -> dict[bytes, bytes]:
    return {
        b"torchvitals.table": table.encode(),
        b"torchvitals.schema_version": str(SCHEMA_VERSION).encode(),
    }


_STEP = pa.field("step", pa.int64(), nullable=False)
_RANK = pa.field("rank", pa.int32(), nullable=False)
_LAYER = pa.field("layer", DICT_STRING, nullable=False)
_KIND = pa.field("kind", DICT_STRING, nullable=False)
#: Which attempt of the rank wrote the row: 0, then one more each time a writer resumes
#: the run in its directory (schema version 3; null in older runs: the first attempt).
_ATTEMPT = pa.field("attempt", pa.int32())
#: Rows of a sharded parameter (schema version 3), set when the run is read: 1 on a row
#: merged from every shard (rank -1), 0 on a shard's row left unmerged because other
#: shards of its step are missing (it describes part of the parameter only); null on
#: every other row. ``torchvitals.store.merge.whole_layer_rows`` keeps the whole ones.
#: (int8 rather than bool: every column of a segment has an integer form for its
#: checksums, see compaction.py.)
_SHARDS_COMPLETE = pa.field("shards_complete", pa.int8())

#: Long format: one row per (step, name).
SCALARS = pa.schema(
    [
        _STEP,
        _RANK,
        _ATTEMPT,
        pa.field("name", DICT_STRING, nullable=False),
        pa.field("value", pa.float64()),
    ],
    metadata=_meta("scalars"),
)


#: One row per (step, layer, kind).
LAYERS = pa.schema(
    [_STEP, _RANK, _ATTEMPT, _LAYER, _KIND]
    + [pa.field(c, pa.int64()) for c in COUNT_KEYS]
    + [pa.field(c, pa.float64()) for c in MOMENT_KEYS]
    # Elements with |x| >= 6 in a linear layer's or norm's output (schema version 2).
    + [pa.field("large", pa.int64()), _SHARDS_COMPLETE],
    metadata=_meta("layers"),
)

#: One row per (step, layer, kind); ``counts`` uses the bins of ``hist_edges`` in the manifest.
HIST = pa.schema(
    [
        _STEP,
        _RANK,
        _ATTEMPT,
        _LAYER,
        _KIND,
        pa.field("counts", pa.list_(pa.int64())),
        # The negative elements of each bin of ``counts`` (schema version 3; null before).
        pa.field("neg_counts", pa.list_(pa.int64())),
        _SHARDS_COMPLETE,
    ],
    metadata=_meta("hist"),
)

#: The statistic columns of ``layers``: what the shards of one parameter combine
#: (``max_abs`` by maximum, every other one by sum).
LAYER_STATS: tuple[str, ...] = (*COUNT_KEYS, *MOMENT_KEYS, "large")

SCHEMAS: dict[str, pa.Schema] = {"scalars": SCALARS, "layers": LAYERS, "hist": HIST}
TABLES: tuple[str, ...] = tuple(SCHEMAS)

#: Columns a submitted batch must provide (``rank`` and ``attempt`` default to the
#: writer's; every other column may be omitted and is then written as null).
REQUIRED: dict[str, tuple[str, ...]] = {
    "scalars": ("step", "name", "value"),
    "layers": ("step", "layer", "kind"),
    "hist": ("step", "layer", "kind", "counts"),
}


def schema_for(table: str) -> pa.Schema:
    """The Arrow schema of ``table``; ``KeyError`` naming the known tables otherwise."""
    try:
        return SCHEMAS[table]
    except KeyError:
        raise KeyError(
            f"unknown torchvitals table {table!r}; known tables: {', '.join(TABLES)}"
        ) from None


def empty_table(table: str) -> pa.Table:
    """A zero-row table with the schema of ``table``."""
    return schema_for(table).empty_table()


def conform(table: str, data: pa.Table | pa.RecordBatch) -> pa.Table:
    """Return ``data`` with exactly the current schema of ``table``.

    Columns are matched by name; a column the data lacks (a run written by an
    older schema version) becomes all-null, a column of another type is cast
    (safe cast only), unknown columns are dropped. Raises ``ValueError`` when a
    required column is missing or cannot be cast.
    """
    schema = schema_for(table)
    if isinstance(data, pa.RecordBatch):
        data = pa.Table.from_batches([data])
    if data.schema.equals(schema, check_metadata=False):
        return data.replace_schema_metadata(schema.metadata)
    cols = []
    for field in schema:
        idx = data.schema.get_field_index(field.name)
        if idx < 0:
            if field.name in REQUIRED[table] or field.name in ("step", "rank"):
                raise ValueError(f"{table}: required column {field.name!r} is missing")
            cols.append(pa.nulls(data.num_rows, field.type))
            continue
        col = data.column(idx)
        if not col.type.equals(field.type):
            try:
                col = col.cast(field.type)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
                raise ValueError(
                    f"{table}: column {field.name!r} has type {col.type}, "
                    f"expected {field.type}: {exc}"
                ) from exc
        cols.append(col)
    return pa.Table.from_arrays(cols, schema=schema)


def dictionary_codes(column: pa.ChunkedArray | pa.Array) -> tuple[np.ndarray, list[str]]:
    """Integer codes and their labels of a string column: dictionary-encoded, as
    torchvitals writes ``layer``, ``kind`` and ``name``, or plain (labels first-seen)."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    if not pa.types.is_dictionary(column.type):
        column = column.cast(pa.string()).dictionary_encode()
    labels = [str(x) for x in column.dictionary.to_pylist()]
    return column.indices.to_numpy(zero_copy_only=False), labels
