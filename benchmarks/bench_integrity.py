"""What the integrity checks cost the writer and the reader.

Writer: one writer-thread cycle of a realistic model (``--layers`` layers, ``--steps``
steps per flush: a ``layers`` and a ``hist`` batch of layers x steps rows each), built
from the submitted columns and appended to its segments. Variants, interleaved:

- ``checked``: a RunWriter cycle (submit, flush): the writer thread builds the batches,
  seals each with its CRC-32 and appends it;
- ``unchecked``: the same with the sealing skipped (no checksum);
- ``pyarrow-file``: the batches built and written by pyarrow's stream writer to a Python
  file (what the writer thread did before this change, without its queue), for reference.

Reader: ``load_run`` of a run of ``--run-steps`` steps with every batch validated
(``validate(full=True)``) and its checksum checked, against ``load_run`` with each segment
read by pyarrow's stream reader alone (the reader before this change); and the same
for the segments alone (no merge, no sort). The cost is the median of the per-round
ratios (checked / unchecked - 1), with quartiles, of the wall clock and of the process's
CPU time (every thread), which a busy machine disturbs less.

    python benchmarks/bench_integrity.py            # writes benchmarks/results/integrity-cpu.json
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
import zlib
from pathlib import Path

import numpy as np
import pyarrow as pa

sys.path.insert(0, str(Path(__file__).resolve().parent))
import timing

from torchvitals.store import integrity, reader
from torchvitals.store.integrity import StreamContents, read_stream
from torchvitals.store.reader import load_run
from torchvitals.store.schema import SCHEMAS
from torchvitals.store.table_builder import TableBuilder
from torchvitals.store.writer import RunWriter


def cycle_items(layers: int, steps: int, first_step: int = 0) -> dict[str, list[dict]]:
    rng = np.random.default_rng(first_step)
    names = [f"blocks.{i // 4}.{['attn', 'mlp', 'norm', 'proj'][i % 4]}" for i in range(layers)]
    items: dict[str, list[dict]] = {"layers": [], "hist": []}
    for step in range(first_step, first_step + steps):
        items["layers"].append(
            {
                "step": step,
                "layer": names,
                "kind": "grad",
                **{k: rng.integers(0, 1000, layers) for k in ("numel", "nan", "zeros", "units")},
                **{k: rng.normal(size=layers) for k in ("sum", "sumsq", "max_abs")},
            }
        )
        items["hist"].append(
            {
                "step": step,
                "layer": names,
                "kind": "grad",
                "counts": rng.integers(0, 99, (layers, 84)),
            }
        )
    return items


def build(items: dict[str, list[dict]]) -> dict[str, pa.RecordBatch]:
    out = {}
    for table, cols in items.items():
        b = TableBuilder(table, 0)
        for c in cols:
            b.add(c)
        out[table] = b.build()
    return out


def writer_variants(directory: str, items):
    """One writer cycle (submit the items, flush) through a RunWriter, with and without
    sealing the batches; and through pyarrow's stream writer on a Python file alone."""
    opts = {"manifest": {"world_size": 1}, "flush_interval": 3600, "max_pending": 10**6}
    checked = RunWriter(os.path.join(directory, "checked"), **opts)
    unchecked = RunWriter(os.path.join(directory, "unchecked"), **opts)
    seal = integrity.Sealer.seal
    files = {t: open(os.path.join(directory, f"{t}.arrows"), "wb") for t in ("layers", "hist")}  # noqa: SIM115
    streams = {t: pa.ipc.new_stream(files[t], SCHEMAS[t]) for t in files}

    def cycle(w):
        for table, cols in items.items():
            for c in cols:
                w.submit(table, c)
        w.flush()

    def run_unchecked():
        integrity.Sealer.seal = lambda self, chunk, batch: chunk
        try:
            cycle(unchecked)
        finally:
            integrity.Sealer.seal = seal

    def run_pyarrow():  # what the writer did before: build, then write to a Python file
        for table, batch in build(items).items():
            streams[table].write_batch(batch)
            files[table].flush()

    def close():
        checked.close()
        unchecked.close()
        for t in files:
            streams[t].close()
            files[t].close()

    variants = {"checked": lambda: cycle(checked), "unchecked": run_unchecked,
                "pyarrow-file": run_pyarrow}  # fmt: skip
    return variants, close


def plain_stream(data: bytes, schema: pa.Schema | None = None) -> StreamContents:
    """A segment read by pyarrow alone: no validation, no checksum (the old reader)."""
    out = StreamContents(checksummed=True)
    with pa.ipc.open_stream(pa.py_buffer(data)) as stream:
        out.schema = stream.schema
        out.batches = list(stream)
    return out


def write_run(path: str, layers: int, steps: int, per_flush: int) -> None:
    with RunWriter(path, manifest={"world_size": 1}, flush_interval=3600, max_pending=10**6) as w:
        for first in range(0, steps, per_flush):
            for table, cols in cycle_items(layers, per_flush, first).items():
                for c in cols:
                    w.submit(table, c)
            for step in range(first, first + per_flush):
                w.submit("scalars", {"step": step, "name": ["loss", "lr"], "value": [1.0, 0.1]})
            w.flush()


def reader_variants(path: str):
    segments = [os.path.join(path, n) for n in sorted(os.listdir(path)) if n.endswith(".arrows")]
    blobs = [Path(p).read_bytes() for p in segments]

    def load_checked():
        load_run(path)

    def load_unchecked():
        reader.read_stream = plain_stream
        try:
            load_run(path)
        finally:
            reader.read_stream = read_stream

    return {
        "load_run checked": load_checked,
        "load_run unchecked": load_unchecked,
        "segments checked": lambda: [read_stream(b) for b in blobs],
        "segments unchecked": lambda: [plain_stream(b) for b in blobs],
    }, sum(len(b) for b in blobs)


def cpu_interleaved(variants, *, repeats: int, warmup: int, inner: int):
    """Like ``timing.interleaved``, but the CPU seconds the process spent (all its
    threads: the writer's, the checksum pool's), which other processes on a busy
    machine disturb much less than the wall clock."""
    for fn in variants.values():
        for _ in range(warmup):
            fn()
    samples = {name: [] for name in variants}
    for _ in range(repeats):
        for name, fn in variants.items():
            t0 = time.process_time()
            for _ in range(inner):
                fn()
            samples[name].append((time.process_time() - t0) / inner)
    return samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=200)
    parser.add_argument("--steps", type=int, default=10, help="steps per writer cycle")
    parser.add_argument("--run-steps", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    tmp = tempfile.mkdtemp(prefix="tv-integrity-")
    try:
        items = cycle_items(args.layers, args.steps)
        variants, close = writer_variants(tmp, items)
        w = timing.interleaved(variants, repeats=args.repeats, warmup=2, inner=3)
        w_cpu = cpu_interleaved(variants, repeats=args.repeats, warmup=0, inner=3)
        close()
        batches = build(items)
        nbytes = sum(b.nbytes for b in batches.values())
        rows = sum(b.num_rows for b in batches.values())

        run = os.path.join(tmp, "run")
        write_run(run, args.layers, args.run_steps, args.steps)
        rvariants, run_bytes = reader_variants(run)
        r = timing.interleaved(rvariants, repeats=args.repeats, warmup=1, inner=1)
        r_cpu = cpu_interleaved(rvariants, repeats=args.repeats, warmup=0, inner=1)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    def cost(samples, name, base):
        q25, q50, q75 = timing.ratio_quartiles(samples[name], samples[base])
        return f"{(q50 - 1) * 100:+.1f}% [{(q25 - 1) * 100:+.1f}, {(q75 - 1) * 100:+.1f}]"

    def row(name, samples, cpu, base, amount, unit):
        med = timing.median(samples[name])
        out = {
            "variant": name,
            "ms": f"{med * 1e3:.2f}",
            "cpu ms": f"{timing.median(cpu[name]) * 1e3:.2f}",
            f"{unit}/s": f"{amount / med / 1e6:.1f}M",
        }
        if base is not None:
            out["cost"] = cost(samples, name, base)
            out["cpu cost"] = cost(cpu, name, base)
        return out

    blob = np.random.default_rng(0).bytes(64 << 20)
    c = timing.interleaved(
        {"nh64": lambda: integrity.nh64(blob), "zlib.crc32": lambda: zlib.crc32(blob)},
        repeats=args.repeats,
        warmup=1,
    )
    hash_rows = [
        {"function": name, "GB/s": f"{len(blob) / timing.median(c[name]) / 1e9:.2f}"} for name in c
    ]
    writer_rows = [
        row("checked", w, w_cpu, "unchecked", rows, "rows"),
        row("unchecked", w, w_cpu, None, rows, "rows"),
        row("pyarrow-file", w, w_cpu, None, rows, "rows"),
    ]
    reader_rows = [
        row("load_run checked", r, r_cpu, "load_run unchecked", run_bytes, "bytes"),
        row("load_run unchecked", r, r_cpu, None, run_bytes, "bytes"),
        row("segments checked", r, r_cpu, "segments unchecked", run_bytes, "bytes"),
        row("segments unchecked", r, r_cpu, None, run_bytes, "bytes"),
    ]
    print("body checksum, one thread, 64 MiB:")
    print(timing.table(hash_rows, ["function", "GB/s"]))
    print(f"\nwriter: one cycle = {rows} rows, {nbytes / 1e6:.2f} MB (layers + hist)")
    print(timing.table(writer_rows, ["variant", "ms", "cpu ms", "rows/s", "cost", "cpu cost"]))
    size = f"{run_bytes / 1e6:.1f} MB"
    print(f"\nreader: a run of {args.run_steps} steps x {args.layers} layers, {size}")
    print(timing.table(reader_rows, ["variant", "ms", "cpu ms", "bytes/s", "cost", "cpu cost"]))
    path = timing.save(
        "integrity-cpu",
        {
            "environment": timing.environment("cpu"),
            "args": vars(args),
            "checksum": hash_rows,
            "writer": writer_rows,
            "reader": reader_rows,
            "samples_s": {**w, **r, **c},
            "cpu_samples_s": {**w_cpu, **r_cpu},
        },
    )
    print(f"\nsaved {path}")


if __name__ == "__main__":
    main()
