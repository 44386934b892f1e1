"""Compressed stream segments: every codec gives back exactly what was written, a crash
still leaves every flushed batch readable, and a bad codec name is a clear error. (Closed
segments become Parquet files, zstd-compressed: compaction is off here, so that the
codec under test is what lies on disk.)"""

from __future__ import annotations

import os

import numpy as np
import pyarrow as pa
import pytest

from torchvitals.store import segments
from torchvitals.store.reader import load_run
from torchvitals.store.writer import RunWriter


def write(path, compression, steps=20, layers=50):
    rng = np.random.default_rng(0)
    with RunWriter(path, manifest={"world_size": 1}, compression=compression) as w:
        for step in range(steps):
            names = [f"block{i}.fc" for i in range(layers)]
            w.submit("scalars", {"step": step, "name": "loss", "value": 1.0 / (step + 1)})
            w.submit(
                "layers",
                {
                    "step": step,
                    "layer": names,
                    "kind": "grad",
                    "numel": np.full(layers, 4096),
                    "sumsq": rng.random(layers),
                },
            )
            hist = np.zeros((layers, 84), np.int64)
            hist[:, 40:50] = rng.integers(0, 400, (layers, 10))  # a few occupied octaves
            w.submit("hist", {"step": step, "layer": names, "kind": "grad", "counts": hist})
    return sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path) if "arrows" in f)


@pytest.mark.parametrize("codec", ["zstd", "lz4"])
def test_every_codec_reads_back_exactly_and_is_smaller(tmp_path, codec, monkeypatch):
    monkeypatch.setattr(segments, "COMPACT", False)
    if not pa.Codec.is_available(codec):
        pytest.skip(f"this pyarrow has no {codec}")
    plain = write(tmp_path / "plain", None)
    packed = write(tmp_path / codec, codec)
    assert packed < plain / 2, (packed, plain)
    a, b = load_run(tmp_path / "plain"), load_run(tmp_path / codec)
    for table in ("scalars", "layers", "hist"):
        assert a.table(table).equals(b.table(table)), table
    assert b.manifest["writer"]["compression"] == codec


def test_default_is_zstd(tmp_path):
    with RunWriter(tmp_path / "run", manifest={}) as w:
        w.submit("scalars", {"step": 0, "name": "loss", "value": 1.0})
    assert load_run(tmp_path / "run").manifest["writer"]["compression"] == "zstd"


def test_unknown_codec_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="compression='gzip'"):
        RunWriter(tmp_path / "run", manifest={}, compression="gzip")
