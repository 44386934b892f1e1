"""What the integrity checks cost the writer and the reader.

Writer: one writer-thread cycle of a realistic model (``--layers`` layers, ``--steps``
steps per flush: a ``layers`` and a ``hist`` batch of layers x steps rows each), built
from the submitted columns and appended to its segments. Variants, interleaved:

- ``checked``: a RunWriter cycle (submit, flush): the writer thread builds the batches,
  seals each with its CRC-32 and appends it;
- ``unchecked``: the same with the sealing skipped (no checksum);
- ``pyarrow-file``: the batches built and written by pyarrow's stream writer to a Python
  file (what the writer thread did before this change, without its queue), for reference.

Compaction (on the writer's own compaction thread, off the training thread): a closed
stream segment of ``--compact-cycles`` cycles converted into its Parquet file, checked
(each stream batch validated and its nh64 checked, the file sealed with the nh64 of its
footer and of each row group's bytes, Parquet page CRCs written) against the same
conversion with those three skipped.
``writer+compaction`` adds a cycle's share of the compaction to the cycle, per round.

Reader, compacted run (what a run looks like once its segments are closed): ``load_run``
with the footer's and every row group's checksum, ``validate(full=True)`` and the row
counts checked, against ``load_run`` with each Parquet file read by pyarrow alone (no
checksum, no validation); and the segments alone.

Reader, stream run (compaction off: a live run's open segments): ``load_run`` of a run of
``--run-steps`` steps with every batch validated
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
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parent))
import timing

from torchvitals.store import compaction, integrity, reader, segments
from torchvitals.store.compaction import parquet_row_groups
from torchvitals.store.integrity import StreamContents, read_stream
from torchvitals.store.layout import parse_segment_file
from torchvitals.store.parquet_seal import FileSeal
from torchvitals.store.reader import load_run
from torchvitals.store.schema import SCHEMAS, conform
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
                "neg_counts": rng.integers(0, 50, (layers, 84)),
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


@contextmanager
def compaction_off():
    """Closed segments stay streams (the writer's cycle timed alone; a stream run)."""
    saved = segments.COMPACT
    segments.COMPACT = False
    try:
        yield
    finally:
        segments.COMPACT = saved


def plain_parquet(source, table: str, path: str, columns=None):
    """A Parquet segment read by pyarrow alone: no checksums, no validation, no row
    counts (conformed to the schema, as the checked reader does)."""
    pf = pq.ParquetFile(source)
    for i in range(pf.metadata.num_row_groups):
        yield conform(table, pf.read_row_group(i, columns=columns)), None


def plain_batches(data):
    """A stream segment's batches as pyarrow reads them: no validation, no checksum."""
    with pa.ipc.open_stream(pa.py_buffer(data)) as stream:
        for batch in stream:
            yield batch, 0


def compaction_variants(directory: str, layers: int, steps: int, cycles: int):
    """Compaction of one closed stream segment of each table (``cycles`` writer cycles),
    checked and with the integrity parts skipped. Each call compacts a fresh copy; the
    copy is made before the clock starts (``prepare``)."""
    src = os.path.join(directory, "compact-src")
    with compaction_off():
        write_run(src, layers, cycles * steps, steps)
    names = sorted(n for n in os.listdir(src) if n.endswith(".arrows"))
    work = os.path.join(directory, "compact-work")
    os.makedirs(work)
    fd = os.open(work, os.O_RDONLY)

    def prepare():
        for n in os.listdir(work):
            os.unlink(os.path.join(work, n))
        for n in names:
            shutil.copyfile(os.path.join(src, n), os.path.join(work, n))

    def run():
        for n in names:
            st = os.stat(n, dir_fd=fd)
            compaction.compact(fd, n, (st.st_dev, st.st_ino))

    def unchecked():
        saved = (compaction.verified_batches, compaction.seal, compaction.PARQUET_OPTIONS)
        compaction.verified_batches = plain_batches
        compaction.seal = lambda data: None
        compaction.PARQUET_OPTIONS = {**saved[2], "write_page_checksum": False}
        try:
            run()
        finally:
            compaction.verified_batches, compaction.seal, compaction.PARQUET_OPTIONS = saved

    return {"compaction checked": run, "compaction unchecked": unchecked}, prepare


def timed_with_setup(variants, prepare, *, repeats: int, warmup: int):
    """Wall and CPU seconds per call, round-robin, ``prepare()`` untimed before each."""
    for fn in variants.values():
        for _ in range(warmup):
            prepare()
            fn()
    wall = {name: [] for name in variants}
    cpu = {name: [] for name in variants}
    for _ in range(repeats):
        for name, fn in variants.items():
            prepare()
            t0, c0 = time.perf_counter(), time.process_time()
            fn()
            wall[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
    return wall, cpu


def parquet_reader_variants(path: str):
    files = [os.path.join(path, n) for n in sorted(os.listdir(path)) if n.endswith(".parquet")]
    blobs = [(Path(p).read_bytes(), parse_segment_file(os.path.basename(p))[0], p) for p in files]

    def load_unchecked():
        reader.parquet_row_groups = plain_parquet
        try:
            load_run(path)
        finally:
            reader.parquet_row_groups = parquet_row_groups

    def segments_with(read):
        return [list(read(pa.BufferReader(b), table, p)) for b, table, p in blobs]

    def seal_checks():  # what the checks add to the decoding: the footer and every group
        for b, _table, _path in blobs:
            source = pa.BufferReader(b)
            meta = pq.ParquetFile(source).metadata
            sealed = FileSeal(source, meta)
            for i in range(meta.num_row_groups):
                sealed.check_group(i)

    def decode():
        for b, _table, _path in blobs:
            pf = pq.ParquetFile(pa.BufferReader(b))
            for i in range(pf.metadata.num_row_groups):
                pf.read_row_group(i)

    return {
        "seal checks alone": seal_checks,
        "parquet decode alone": decode,
        "load_run parquet checked": lambda: load_run(path),
        "load_run parquet unchecked": load_unchecked,
        "parquet segments checked": lambda: segments_with(parquet_row_groups),
        "parquet segments unchecked": lambda: segments_with(plain_parquet),
    }, sum(len(b) for b, _, _ in blobs)


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


def commit() -> str:
    """The checkout's commit (with "+dirty" when files differ from it)."""
    import subprocess

    root = Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root,
            capture_output=True,
            text=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("+dirty" if dirty else "")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=200)
    parser.add_argument("--steps", type=int, default=10, help="steps per writer cycle")
    parser.add_argument("--run-steps", type=int, default=1000)
    parser.add_argument("--compact-cycles", type=int, default=50, help="cycles per segment")
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    tmp = tempfile.mkdtemp(prefix="tv-integrity-")
    try:
        items = cycle_items(args.layers, args.steps)
        with compaction_off():  # the cycle alone; compaction is timed on its own below
            variants, close = writer_variants(tmp, items)
            w = timing.interleaved(variants, repeats=args.repeats, warmup=2, inner=3)
            w_cpu = cpu_interleaved(variants, repeats=args.repeats, warmup=0, inner=3)
            close()
        batches = build(items)
        nbytes = sum(b.nbytes for b in batches.values())
        rows = sum(b.num_rows for b in batches.values())

        cvariants, prepare = compaction_variants(tmp, args.layers, args.steps, args.compact_cycles)
        cw, cw_cpu = timed_with_setup(cvariants, prepare, repeats=args.repeats, warmup=1)
        # A cycle's share of its segment's compaction, added to the cycle, per round.
        share = 1.0 / args.compact_cycles
        for out, cyc, comp in ((w, w, cw), (w_cpu, w_cpu, cw_cpu)):
            for v, cv in (("checked", "compaction checked"), ("unchecked", "compaction unchecked")):
                out[f"{v}+compaction"] = [
                    a + b * share for a, b in zip(cyc[v], comp[cv], strict=True)
                ]

        run = os.path.join(tmp, "run")
        with compaction_off():
            write_run(run, args.layers, args.run_steps, args.steps)
        rvariants, run_bytes = reader_variants(run)
        r = timing.interleaved(rvariants, repeats=args.repeats, warmup=1, inner=1)
        r_cpu = cpu_interleaved(rvariants, repeats=args.repeats, warmup=0, inner=1)

        prun = os.path.join(tmp, "compacted-run")
        write_run(prun, args.layers, args.run_steps, args.steps)  # compacted at close()
        assert not [n for n in os.listdir(prun) if n.endswith(".arrows")], os.listdir(prun)
        pvariants, prun_bytes = parquet_reader_variants(prun)
        pr = timing.interleaved(pvariants, repeats=args.repeats, warmup=1, inner=1)
        pr_cpu = cpu_interleaved(pvariants, repeats=args.repeats, warmup=0, inner=1)
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
        row("checked+compaction", w, w_cpu, "unchecked+compaction", rows, "rows"),
        row("unchecked+compaction", w, w_cpu, None, rows, "rows"),
    ]
    compact_rows = args.compact_cycles * rows
    compaction_rows = [
        row("compaction checked", cw, cw_cpu, "compaction unchecked", compact_rows, "rows"),
        row("compaction unchecked", cw, cw_cpu, None, compact_rows, "rows"),
    ]
    parquet_rows = [
        row("load_run parquet checked", pr, pr_cpu, "load_run parquet unchecked", prun_bytes,
            "bytes"),
        row("load_run parquet unchecked", pr, pr_cpu, None, prun_bytes, "bytes"),
        row("parquet segments checked", pr, pr_cpu, "parquet segments unchecked", prun_bytes,
            "bytes"),
        row("parquet segments unchecked", pr, pr_cpu, None, prun_bytes, "bytes"),
    ]  # fmt: skip
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
    print(f"\ncompaction: one segment per table of {args.compact_cycles} cycles")
    print(timing.table(compaction_rows, ["variant", "ms", "cpu ms", "rows/s", "cost", "cpu cost"]))
    size = f"{prun_bytes / 1e6:.1f} MB"
    print(f"\nreader, compacted: a run of {args.run_steps} steps x {args.layers} layers, {size}")
    print(timing.table(parquet_rows, ["variant", "ms", "cpu ms", "bytes/s", "cost", "cpu cost"]))
    # Steadier than the ratios above on a shared machine: the checks timed on their own.
    share = {
        "seal checks cpu ms": f"{np.median(pr_cpu['seal checks alone']) * 1e3:.1f}",
        "decode cpu ms": f"{np.median(pr_cpu['parquet decode alone']) * 1e3:.1f}",
        "share": "{:.1%}".format(
            np.median(pr_cpu["seal checks alone"]) / np.median(pr_cpu["parquet decode alone"])
        ),
    }
    print("the seal checks alone, against decoding the same files (CPU):", share)
    size = f"{run_bytes / 1e6:.1f} MB"
    print(f"\nreader, streams: a run of {args.run_steps} steps x {args.layers} layers, {size}")
    print(timing.table(reader_rows, ["variant", "ms", "cpu ms", "bytes/s", "cost", "cpu cost"]))
    path = timing.save(
        "integrity-cpu",
        {
            "environment": timing.environment("cpu"),
            "commit": commit(),
            "args": vars(args),
            "checksum": hash_rows,
            "writer": writer_rows,
            "compaction": compaction_rows,
            "reader_compacted": parquet_rows,
            "seal_checks_against_decoding": share,
            "reader": reader_rows,
            "samples_s": {**w, **cw, **pr, **r, **c},
            "cpu_samples_s": {**w_cpu, **cw_cpu, **pr_cpu, **r_cpu},
        },
    )
    print(f"\nsaved {path}")


if __name__ == "__main__":
    main()
