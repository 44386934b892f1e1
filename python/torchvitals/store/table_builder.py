"""Conversion of submitted column dicts into Arrow record batches, one table at a time.

Runs on the writer thread: the training thread hands over numpy arrays, torch CPU
tensors, lists or scalars (broadcast), and nothing here is ever called on it.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from typing import Any

import numpy as np
import pyarrow as pa

from torchvitals.store.schema import DICT_STRING, REQUIRED, SCHEMAS

Columns = Mapping[str, Any]


def _to_numpy(value: Any) -> Any:
    """torch tensors -> numpy (on the writer thread); everything else unchanged."""
    if type(value).__module__.startswith("torch") and hasattr(value, "detach"):
        t = value.detach()
        if t.device.type != "cpu":
            t = t.cpu()
        if str(t.dtype) in ("torch.bfloat16", "torch.float8_e4m3fn", "torch.float8_e5m2"):
            t = t.float()
        return t.numpy()
    return value


_PY_SCALARS = (int, float, str, bool, np.generic, type(None))
_STR, _LIST = "str", "list"


def _column_kind(t: pa.DataType) -> Any:
    if t == DICT_STRING:
        return _STR
    if pa.types.is_list(t):
        return _LIST
    return np.dtype(t.to_pandas_dtype())


class TableBuilder:
    """Accumulates the columns of many submitted items of one table.

    Per column, ``parts`` is a list of chunks in submission order: a Python list
    (consecutive scalar/broadcast values), a numpy array, or for list columns a
    ``(lengths, flat_values, valid)`` triple. ``build`` turns them into one batch.
    """

    def __init__(self, table: str, rank: int, attempt: int | None = None):
        self.table = table
        self.schema = SCHEMAS[table]
        self.rank = rank
        self.attempt = attempt
        self.required = REQUIRED[table]
        self.kinds = {f.name: _column_kind(f.type) for f in self.schema}
        self.parts: dict[str, list[Any]] = {n: [] for n in self.kinds}
        self.items = 0
        self.max_step: int | None = None

    def add(self, cols: Columns) -> None:
        """Validate and convert one item; nothing is kept if it raises."""
        if not isinstance(cols, Mapping):
            raise TypeError(f"{self.table}: columns must be a mapping, got {type(cols).__name__}")
        kinds = self.kinds
        for k in self.required:
            if k not in cols:
                missing = [c for c in self.required if c not in cols]
                raise ValueError(f"{self.table}: missing required column(s) {missing}")
        values: dict[str, Any] = {}
        n = None
        for k, v in cols.items():
            kind = kinds.get(k)
            if kind is None:
                unknown = [c for c in cols if c not in kinds]
                raise ValueError(
                    f"{self.table}: unknown column(s) {unknown}; schema has {list(kinds)}"
                )
            if kind is _LIST:
                v = self._list_value(k, _to_numpy(v))
                length = len(v[0])
            elif isinstance(v, _PY_SCALARS):
                values[k] = v
                continue
            else:
                v = _to_numpy(v)
                if kind is _STR:
                    if isinstance(v, np.ndarray) and v.ndim == 0:
                        values[k] = v.item()
                        continue
                    v = [x if isinstance(x, str) else str(x) for x in v]
                else:
                    # A masked array keeps its mask: masked entries are written as nulls.
                    masked = isinstance(v, np.ma.MaskedArray)
                    v = v.astype(kind) if masked else np.asarray(v, dtype=kind)
                    if v.ndim == 0:
                        values[k] = v.item()
                        continue
                    v = v.reshape(-1)
                length = len(v)
            values[k] = v
            if n is None:
                n = length
            elif length != n:
                raise ValueError(f"{self.table}: column {k!r} has {length} rows, expected {n}")
        n = 1 if n is None else n
        if "rank" not in values:
            values["rank"] = self.rank
        if "attempt" not in values:
            values["attempt"] = self.attempt
        # convert every scalar (broadcast) now, so that build() cannot fail on this item
        converted: dict[str, Any] = {}
        for k, kind in kinds.items():
            v = values.get(k)
            if kind is _LIST:
                converted[k] = v if v is not None else (np.zeros(n, np.int64), _EMPTY_I64, False)
            elif isinstance(v, (list, np.ndarray)):
                converted[k] = v
            elif v is None:
                converted[k] = [None] * n
            elif kind is _STR:
                converted[k] = [v if isinstance(v, str) else str(v)] * n
            elif kind.kind == "f":
                converted[k] = [float(v)] * n
            else:
                converted[k] = [int(v)] * n
        if n:
            step = converted["step"]
            s = int(step.max()) if isinstance(step, np.ndarray) else step[0]
            if s is None:
                raise ValueError(f"{self.table}: step must not be None")
            self.max_step = s if self.max_step is None else max(self.max_step, s)
        parts = self.parts
        for k, v in converted.items():
            p = parts[k]
            if isinstance(v, list) and p and isinstance(p[-1], list):
                p[-1].extend(v)
            else:
                p.append(list(v) if isinstance(v, list) else v)
        self.items += 1

    def _list_value(self, k: str, v: Any) -> tuple[np.ndarray, np.ndarray, bool]:
        """``(lengths, flat values, valid)`` of a list column: 2-D array = rows, 1-D = one row."""
        if isinstance(v, np.ndarray) or (
            isinstance(v, (list, tuple)) and all(isinstance(x, _PY_SCALARS) for x in v)
        ):
            arr = np.asarray(v, dtype=np.int64)
            if arr.ndim == 1:
                arr = arr[None, :]
            if arr.ndim != 2:
                raise ValueError(f"{self.table}: column {k!r} must be 1-D (one row) or 2-D (rows)")
            return np.full(arr.shape[0], arr.shape[1], dtype=np.int64), arr.reshape(-1), True
        if isinstance(v, (list, tuple)):
            rows = [np.asarray(_to_numpy(r), dtype=np.int64).reshape(-1) for r in v]
            lengths = np.array([len(r) for r in rows], dtype=np.int64)
            flat = np.concatenate(rows) if rows else _EMPTY_I64
            return lengths, flat, True
        raise TypeError(
            f"{self.table}: column {k!r} needs an array, tensor or list of rows, "
            f"got {type(v).__name__}"
        )

    def build(self) -> pa.RecordBatch:
        arrays = []
        for field in self.schema:
            parts = self.parts[field.name]
            t = field.type
            if self.kinds[field.name] is _LIST:
                lens = np.concatenate([p[0] for p in parts])
                offsets = np.zeros(len(lens) + 1, dtype=np.int32)  # list<> has int32 offsets
                np.cumsum(lens, out=offsets[1:])
                flat = np.concatenate([p[1] for p in parts])
                mask = None
                if not all(p[2] for p in parts):
                    mask = pa.array(np.concatenate([np.full(len(p[0]), not p[2]) for p in parts]))
                arrays.append(
                    pa.ListArray.from_arrays(
                        pa.array(offsets), pa.array(flat, type=pa.int64()), mask=mask
                    )
                )
            elif len(parts) == 1:
                arrays.append(pa.array(parts[0], type=t))
            elif self.kinds[field.name] is not _STR and all(
                isinstance(p, np.ndarray) for p in parts
            ):
                concatenate = (
                    np.ma.concatenate
                    if any(isinstance(p, np.ma.MaskedArray) for p in parts)
                    else np.concatenate
                )
                arrays.append(pa.array(concatenate(parts), type=t))
            else:
                flat_list: list[Any] = []
                for p in parts:
                    flat_list.extend(p.tolist() if isinstance(p, np.ndarray) else p)
                arrays.append(pa.array(flat_list, type=t))
        return pa.RecordBatch.from_arrays(arrays, schema=self.schema)


_EMPTY_I64 = np.empty(0, np.int64)
_WARM = threading.Lock()
_warmed = False


def warm_up() -> None:
    """Exercise every conversion once, early, on the writer thread.

    pyarrow initialises lazily (``pa.array`` imports pandas when it is installed);
    done for the first time during interpreter shutdown (the atexit drain), that
    fails with "can't register atexit after shutdown". Paying it at start avoids it.
    """
    global _warmed
    with _WARM:
        if _warmed:
            return
        samples = {
            "scalars": [
                {"step": 0, "name": "x", "value": 0.0},
                {"step": [1], "name": ["y"], "value": [1]},
            ],
            "layers": [
                {
                    "step": 0,
                    "layer": ["x"],
                    "kind": "x",
                    "numel": np.zeros(1, np.int64),
                    "sum": [0.0],
                }
            ],
            "hist": [
                {"step": 0, "layer": "x", "kind": "x", "counts": np.zeros((1, 2), np.int64)},
                {"step": 1, "layer": ["y"], "kind": ["y"], "counts": [[1, 2]]},
            ],
        }
        for table, items in samples.items():
            b = TableBuilder(table, 0)
            for item in items:
                b.add(item)
            batch = b.build()
            with pa.ipc.new_stream(pa.BufferOutputStream(), batch.schema) as w:
                w.write_batch(batch)
        _warmed = True
