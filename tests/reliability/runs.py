"""The small run every corruption case starts from, and what "intact" means for it."""

from __future__ import annotations

import warnings
from collections import Counter

import numpy as np

STEPS = 6
MANIFEST = {
    "world_size": 1,
    "device": "cpu",
    "distributed": {"grads_on": "all", "sharded": {}, "backend": None},
    "config": {"every": 1, "histograms": True, "on_full": "drop"},
    "layers": [
        {"name": "fc1", "type": "Linear", "param_shapes": {"weight": [4, 2]}},
        {"name": "fc2", "type": "Linear", "param_shapes": {"weight": [2, 4]}},
    ],
    "hist_edges": {"min_exp": -64, "max_exp": 16},
}


def write_template(path: str, compact: bool = False) -> None:
    """One record batch per table and step (a flush after every step), closed cleanly;
    the closed segments stay Arrow streams, or with ``compact`` become Parquet files."""
    from torchvitals.store import segments
    from torchvitals.store.writer import RunWriter

    saved, segments.COMPACT = segments.COMPACT, compact
    try:
        _write(path, RunWriter)
    finally:
        segments.COMPACT = saved


def _write(path: str, RunWriter) -> None:
    with RunWriter(path, manifest=MANIFEST, flush_interval=60) as w:
        for step in range(STEPS):
            w.submit(
                "scalars",
                {"step": step, "name": ["loss", "lr/group0"], "value": [1.0 / (step + 1), 0.1]},
            )
            w.submit(
                "layers",
                {
                    "step": step,
                    "layer": ["fc1", "fc2"],
                    "kind": "grad",
                    "numel": [8, 8],
                    "nan": [0, step % 2],
                    "sum": np.array([0.5, -0.25]) * (step + 1),
                    "sumsq": np.array([4.0, 9.0]) * (step + 1),
                    "max_abs": [1.5, 2.5],
                },
            )
            w.submit(
                "hist",
                {
                    "step": step,
                    "layer": ["fc1", "fc2"],
                    "kind": "grad",
                    "counts": np.arange(16, dtype=np.int64).reshape(2, 8) + step,
                },
            )
            w.flush()


def _key(value):
    if isinstance(value, list):
        return tuple(_key(v) for v in value)
    if isinstance(value, float) and value != value:
        return "nan"
    return value


def rows(table) -> Counter:
    """The rows of a pyarrow table as a multiset of tuples (validated first)."""
    table.validate(full=True)
    names = table.column_names
    return Counter(tuple(_key(r[n]) for n in names) for r in table.to_pylist())


def load(path: str):
    """``(run or exception, warning messages)``."""
    from torchvitals.store.reader import load_run

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            run = load_run(path)
        except Exception as exc:  # classified by the caller
            run = exc
    return run, [str(w.message) for w in caught]
