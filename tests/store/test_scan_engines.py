"""The one-line lazy queries docs/schema.md gives for pyarrow.dataset, polars and duckdb,
run verbatim on a closed run written by a real Monitor loop, against load_run."""

from __future__ import annotations

import glob
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pytest
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from training_runs import classification, mlp, train

from torchvitals.store.reader import load_run

DOCS = Path(__file__).resolve().parents[2] / "docs" / "schema.md"
# Exactly as docs/schema.md writes them ("Every table, lazily, in one line").
ONE_LINERS = {
    "pyarrow": 'ds.dataset(sorted(glob.glob(f"{run_dir}/{table}.rank*.parquet")), '
    'format="parquet").to_table()',
    "polars": 'pl.scan_parquet(f"{run_dir}/{table}.rank*.parquet").collect()',
    "duckdb": "duckdb.sql(f\"SELECT * FROM read_parquet('{run_dir}/{table}.rank*.parquet')\")"
    ".arrow()",
}
KEYS = {"scalars": ["step", "rank", "name"], "layers": ["step", "rank", "layer", "kind"]}
KEYS["hist"] = KEYS["layers"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("scan") / "run"
    model = mlp(0, act=nn.Tanh)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    train(path, model, opt, 40, classification(0, n=512), weight_every=5)
    return str(path)


def canonical(table) -> pa.Table:
    """Strings for labels, rows in key order: engines differ in label types and row order."""
    if isinstance(table, pa.RecordBatchReader):
        table = table.read_all()
    cols = {}
    for name in table.column_names:
        col = table[name]
        if pa.types.is_dictionary(col.type) or pa.types.is_large_string(col.type):
            col = col.cast(pa.string())
        if pa.types.is_large_list(col.type):
            col = col.cast(pa.list_(pa.int64()))
        cols[name] = col
    return pa.table(cols)


@pytest.mark.parametrize("engine", sorted(ONE_LINERS))
@pytest.mark.parametrize("table", ["scalars", "layers", "hist"])
def test_one_liner_reads_exactly_what_load_run_reads(run_dir, engine, table):
    pytest.importorskip(
        {"pyarrow": "pyarrow.dataset", "polars": "polars", "duckdb": "duckdb"}[engine]
    )
    import duckdb  # noqa: F401
    import polars as pl  # noqa: F401
    import pyarrow.dataset as ds  # noqa: F401

    line = ONE_LINERS[engine]
    assert line in DOCS.read_text(encoding="utf-8"), f"docs/schema.md lacks: {line}"
    assert glob.glob(f"{run_dir}/*.parquet") and not glob.glob(f"{run_dir}/*.arrows")
    got = eval(line, {**globals(), **locals(), "run_dir": run_dir, "table": table})
    if engine == "polars":
        got = got.to_arrow()
    want = load_run(run_dir).table(table)
    assert want.num_rows > 0
    got, want = canonical(got), canonical(want)
    assert got.column_names == want.column_names
    order = [(k, "ascending") for k in KEYS[table]]
    got = got.take(pc.sort_indices(got, sort_keys=order))
    want = want.take(pc.sort_indices(want, sort_keys=order))
    assert got.cast(want.schema).equals(want)
