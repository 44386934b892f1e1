"""Bytes on disk per tensor and step, and the writer's throughput, with compaction to Parquet.

Size: a run recorded by a real Monitor loop with every closed segment left an Arrow
stream (zstd record batches: what the writer did before compaction), then the same
files compacted (``torchvitals.store.compaction.compact``, what the writer now does at
rotation and close). "Per tensor and step" = total bytes of all tables (scalars, layers,
hist) / rows of ``layers`` (one row per tensor and step). Two models:

- ``demo``: the demo CNN of ``torchvitals demo`` (``torchvitals.demo.train``);
- ``gpt2``: the GPT-2-small layout of ``benchmarks/models.py`` (12 blocks, 768 wide;
  vocabulary and context cut to ``--vocab``/``--ctx`` so that a CPU trains it), trained
  on random tokens with a Monitor (histograms on, weights every 10 steps). 60 steps by
  default (``--gpt2-steps``): the figure hardly depends on the run's length, the fixed
  costs of a file being small (with the files grouped by tensor, 71.7 bytes per tensor
  and step over 60 steps, 69.7 over 300: the default is slightly pessimistic).

Throughput: a RunWriter fed synthetic layer and histogram rows (``bench_integrity``'s
cycle: ``--layers`` layers x ``--steps`` steps per flush, 84 bins) with small segments
(``--segment-mib``) so they rotate, timed from the first submit to the end of
``close()`` (every segment compacted), against the same with compaction off;
interleaved, medians of ``--repeats`` rounds.

    python benchmarks/bench_storage.py          # writes benchmarks/results/storage-cpu.json
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import timing
from bench_integrity import cycle_items
from models import GPT2Small

from torchvitals.store import segments
from torchvitals.store.compaction import compact
from torchvitals.store.layout import parse_segment_file
from torchvitals.store.reader import load_run
from torchvitals.store.writer import RunWriter


def sizes(path: Path) -> dict[str, int]:
    """Bytes per table of the segments in ``path``."""
    out: dict[str, int] = {}
    for name in os.listdir(path):
        parsed = parse_segment_file(name)
        if parsed:
            out[parsed[0]] = out.get(parsed[0], 0) + (path / name).stat().st_size
    return out


def compact_all(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for name in sorted(os.listdir(path)):
            parsed = parse_segment_file(name)
            if parsed and parsed[3] == "arrows":
                st = os.stat(path / name)
                compact(fd, name, (st.st_dev, st.st_ino))
    finally:
        os.close(fd)


def measure(stream_dir: Path, work: Path) -> dict:
    """Sizes of the streams in ``stream_dir`` and of their compacted copies."""
    run = load_run(stream_dir)
    tensor_steps = run.per_rank and sum(t.num_rows for t in run.per_rank["layers"].values())
    steps = len(set(run.scalars["step"].to_pylist()))
    before = sizes(stream_dir)
    copy = work / "compacted"
    shutil.copytree(stream_dir, copy)
    t0 = time.perf_counter()
    compact_all(copy)
    seconds = time.perf_counter() - t0
    after = sizes(copy)
    again = load_run(copy)
    assert all(again.table(t).equals(run.table(t)) for t in ("scalars", "layers")), "rows differ"
    shutil.rmtree(copy)

    def per(table_sizes):
        return {t: round(n / tensor_steps, 1) for t, n in sorted(table_sizes.items())} | {
            "total": round(sum(table_sizes.values()) / tensor_steps, 1)
        }

    return {
        "steps": steps,
        "tensors_per_step": round(tensor_steps / steps, 1),
        "tensor_steps": tensor_steps,
        "bytes_stream_zstd": sum(before.values()),
        "bytes_parquet": sum(after.values()),
        "bytes_per_tensor_step_stream_zstd": per(before),
        "bytes_per_tensor_step_parquet": per(after),
        "compaction_s": round(seconds, 2),
    }


def demo_run(path: Path, steps: int) -> None:
    from torchvitals.demo import train

    train(path, steps=steps)


def gpt2_run(path: Path, steps: int, vocab: int, ctx: int) -> None:
    from torchvitals import Monitor

    torch.manual_seed(0)
    model = GPT2Small(vocab=vocab, ctx=ctx)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4)
    gen = torch.Generator().manual_seed(1)
    with Monitor(model, path, optimizer=opt, weight_every=10, on_full="block") as mon:
        for _ in range(steps):
            idx = torch.randint(0, vocab, (2, ctx + 1), generator=gen)
            logits = model(idx[:, :-1])
            loss = nn.functional.cross_entropy(logits.reshape(-1, vocab), idx[:, 1:].reshape(-1))
            opt.zero_grad()
            loss.backward()
            opt.step()
            mon.step(loss=loss)


def throughput(work: Path, args) -> dict:
    items = cycle_items(args.layers, args.steps)
    rows = args.cycles * sum(len(c["layer"]) for cols in items.values() for c in cols)

    def once(compacting: bool) -> float:
        path = work / f"w{compacting}"
        saved, segments.COMPACT = segments.COMPACT, compacting
        try:
            t0 = time.perf_counter()
            w = RunWriter(
                path,
                manifest={"world_size": 1},
                flush_interval=3600,
                max_pending=10**6,
                on_full="block",
                segment_bytes=args.segment_mib << 20,
            )
            for cycle in range(args.cycles):
                for table, cols in cycle_items(args.layers, args.steps, cycle * args.steps).items():
                    for c in cols:
                        w.submit(table, c)
                w.flush()
            w.close()
            return time.perf_counter() - t0
        finally:
            segments.COMPACT = saved
            shutil.rmtree(path, ignore_errors=True)

    samples = timing.interleaved(
        {"compacted": lambda: once(True), "streams only": lambda: once(False)},
        repeats=args.repeats,
        warmup=1,
    )
    out = {}
    for name, s in samples.items():
        out[name] = {"s": round(timing.median(s), 3), "rows/s": round(rows / timing.median(s))}
    q25, q50, q75 = timing.ratio_quartiles(samples["compacted"], samples["streams only"])
    out["rows"] = rows
    out["compacted / streams only (wall)"] = [round(q, 3) for q in (q25, q50, q75)]
    return out, samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--demo-steps", type=int, default=4000)
    parser.add_argument("--gpt2-steps", type=int, default=60)
    parser.add_argument("--vocab", type=int, default=2048)
    parser.add_argument("--ctx", type=int, default=64)
    parser.add_argument("--layers", type=int, default=200)
    parser.add_argument("--steps", type=int, default=10, help="steps per writer cycle")
    parser.add_argument("--cycles", type=int, default=60)
    parser.add_argument("--segment-mib", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--skip-models", action="store_true")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="tv-storage-"))
    results: dict = {"environment": timing.environment("cpu"), "args": vars(args)}
    try:
        saved, segments.COMPACT = segments.COMPACT, False  # record streams, compact after
        try:
            if not args.skip_models:
                demo_run(work / "demo", args.demo_steps)
                gpt2_run(work / "gpt2", args.gpt2_steps, args.vocab, args.ctx)
        finally:
            segments.COMPACT = saved
        if not args.skip_models:
            for name in ("demo", "gpt2"):
                results[name] = measure(work / name, work)
                print(name, results[name])
        results["writer"], samples = throughput(work, args)
        results["samples_s"] = samples
        print("writer", results["writer"])
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(timing.save("storage-cpu", results))


if __name__ == "__main__":
    main()
