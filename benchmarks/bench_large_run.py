"""A large run read in bounded memory: peak RSS and time of the analysis, lazy against eager.

Writes a synthetic run fast with ``RunWriter`` directly (``--ranks`` ranks x ``--tensors``
tensors x ``--steps`` steps, histograms on: every step a ``layers`` and a ``hist`` row per
tensor; half the tensors gradients recorded by rank 0, half activations recorded by every
rank, as under DDP), closed and compacted as the writer does it. Then, each in a child
process (its peak RSS from ``getrusage``):

- ``lazy``: the analysis through ``scan_run`` (the per-layer series streamed in step
  chunks, merged with ``merge_ranks`` chunk by chunk), ``detect_events``, and the
  histograms the report draws (``histogram_layers``: the three layers whose gradient norm
  spans the most) through ``RunScan.histogram``;
- ``report``: ``torchvitals report RUN``, the whole HTML report (the series, the events,
  every heatmap and the histograms of every (layer, kind) at up to ~256 steps), as a user
  runs it, through ``scan_run``;
- ``eager``: the same as ``lazy`` through ``load_run`` (every table of every rank in memory), run
  only when ``--eager`` is given, with its address space capped at ``--eager-cap-gb`` so
  it cannot take the machine down: a ``MemoryError`` is reported as "did not fit".

    python benchmarks/bench_large_run.py           # 4 x 500 x 5000 -> results/large-run-cpu.json
    python benchmarks/bench_large_run.py --steps 500 --eager    # quick, both paths
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import timing

BINS = 84


def write_rank(path: Path, rank: int, ranks: int, tensors: int, steps: int, every: int) -> None:
    from torchvitals.store.writer import RunWriter

    layers = tensors // 2
    names = [f"blocks.{i // 4}.{['attn', 'mlp', 'norm', 'proj'][i % 4]}" for i in range(layers)]
    manifest = {"world_size": ranks, "layers": [{"name": n} for n in names]}
    rng = np.random.default_rng(rank)
    center = rng.integers(40, 70, layers)
    drift = rng.normal(0, 0.002, layers)
    grads = rank == 0
    with RunWriter(
        path, manifest=manifest, rank=rank, on_full="block", flush_interval=3600,
        max_pending=10**6,
    ) as w:  # fmt: skip
        for start in range(0, steps, every):
            for step in range(start, min(start + every, steps)):
                loss = 2.0 * np.exp(-step / (steps / 3)) + 0.05 * rng.random()
                w.submit("scalars", {"step": step, "name": ["loss", "lr/group0", "grad_norm"],
                                     "value": [loss, 1e-3, 1.0 + rng.random()]})  # fmt: skip
                kinds = ["grad", "act"] if grads else ["act"]
                n = layers * len(kinds)
                norm = np.exp(drift * step + rng.normal(0, 0.1, layers))
                w.submit(
                    "layers",
                    {
                        "step": step,
                        "layer": names * len(kinds),
                        "kind": [k for k in kinds for _ in names],
                        "numel": np.full(n, 4096),
                        "nan": np.zeros(n, np.int64),
                        "inf": np.zeros(n, np.int64),
                        "zeros": rng.integers(0, 50, n),
                        "units": np.where(np.arange(n) >= n - layers, 64, 0),
                        "dead_units": rng.integers(0, 3, n),
                        "saturated": rng.integers(0, 5, n),
                        "sum": rng.normal(0, 1, n),
                        "sumsq": np.tile(norm, len(kinds)) ** 2,
                        "max_abs": np.tile(norm, len(kinds)) * 3,
                    },
                )
                counts = np.zeros((n, BINS), np.int64)
                mid = np.tile(center, len(kinds))
                for d in range(-4, 5):  # a bell over nine bins around each tensor's scale
                    counts[np.arange(n), mid + d] = rng.poisson(4096 / (1 + d * d) / 3, n)
                w.submit("hist", {"step": step, "layer": names * len(kinds),
                                  "kind": [k for k in kinds for _ in names],
                                  "counts": counts})  # fmt: skip
            w.flush()


CHILD = r"""
import json, os, resource, sys, time, warnings
warnings.simplefilter("ignore")
mode, path = sys.argv[1], sys.argv[2]
if mode == "eager":
    cap = int(float(sys.argv[3]) * (1 << 30))
    resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
from torchvitals.analysis import detect_events
from torchvitals.analysis.runtables import series_from_run
from torchvitals.analysis.summary import histogram_layers, histogram_matrix
from torchvitals.store.reader import load_run
from torchvitals.store.scan import scan_run
imported_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
cpu0 = sum(resource.getrusage(resource.RUSAGE_SELF)[:2])
t0 = time.perf_counter()
try:
    if mode == "report":  # what a user runs: `torchvitals report RUN`, the whole page
        from torchvitals.cli import main
        import contextlib, io
        with contextlib.redirect_stdout(io.StringIO()):
            status = main(["report", path, "--out", path + ".report.html"])
        out = {"ok": status == 0, "exit": status, "total_s": time.perf_counter() - t0,
               "report_bytes": os.path.getsize(path + ".report.html")}
        raise SystemExit
    if mode == "lazy":
        run = scan_run(path)
        hists = lambda pairs: list(run.histograms(pairs).values())  # one pass for all
    else:
        run = load_run(path)
        hists = lambda pairs: [histogram_matrix(run, *pair) for pair in pairs]
    t_open = time.perf_counter() - t0
    step, loss, lr, series = series_from_run(run)
    t_series = time.perf_counter() - t0
    cpu_series = sum(resource.getrusage(resource.RUSAGE_SELF)[:2]) - cpu0
    events = detect_events(loss=loss, step=step, lr=lr, **series)
    t_events = time.perf_counter() - t0
    shown = hists([(layer, "grad") for layer in histogram_layers(run, series)])
    out = {"ok": True, "open_s": t_open, "series_s": t_series, "events_s": t_events,
           "series_cpu_s": cpu_series,
           "total_s": time.perf_counter() - t0, "events": len(events), "steps": len(step),
           "series": len(series), "histograms": sum(h is not None for h in shown)}
except SystemExit:
    pass
except MemoryError:
    out = {"ok": False, "why": "MemoryError (did not fit under the cap)",
           "total_s": time.perf_counter() - t0}
usage = resource.getrusage(resource.RUSAGE_SELF)
out["peak_rss_mb"] = usage.ru_maxrss / 1024
out["cpu_s"] = usage.ru_utime + usage.ru_stime  # imports included
out["rss_after_imports_mb"] = imported_mb
print(json.dumps(out))
"""


def child(mode: str, path: Path, cap_gb: float) -> dict:
    env = dict(os.environ)
    src = str(Path(__file__).resolve().parents[1] / "python")
    env["PYTHONPATH"] = src + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, mode, str(path), str(cap_gb)],
        capture_output=True, text=True, env=env, check=False,
    )  # fmt: skip
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode or not lines:
        return {"ok": False, "why": f"exit {proc.returncode}: {proc.stderr[-600:]}"}
    return json.loads(lines[-1])


def wait_compacted(path: Path, limit: float = 1200.0) -> float:
    """Seconds until the last closed segments are compacted (the writer finishes them in
    the background after close()), so that the readers see the run as it stays."""
    t0 = time.perf_counter()
    while any(f.suffix in (".arrows", ".tmp") for f in path.iterdir()):
        if time.perf_counter() - t0 > limit:
            raise TimeoutError(f"{path}: segments still not compacted after {limit:g} s")
        time.sleep(0.5)
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, default=4)
    parser.add_argument("--tensors", type=int, default=500)
    parser.add_argument("--steps", type=int, default=5000)
    parser.add_argument("--every", type=int, default=20, help="steps per writer flush")
    parser.add_argument("--eager", action="store_true", help="also time load_run")
    parser.add_argument("--eager-cap-gb", type=float, default=12.0)
    parser.add_argument("--dir", help="where to write the run (default: a temporary directory)")
    parser.add_argument("--name", default="large-run-cpu")
    parser.add_argument(
        "--reuse", action="store_true", help="read the run already in --dir (do not write one)"
    )
    args = parser.parse_args()
    work = Path(args.dir or tempfile.mkdtemp(prefix="tv-large-"))
    path = work / "run"
    try:
        t0 = time.perf_counter()
        reused = args.reuse and path.is_dir()
        if not reused:
            for rank in range(args.ranks):
                write_rank(path, rank, args.ranks, args.tensors, args.steps, args.every)
        waited = wait_compacted(path)
        write_s = time.perf_counter() - t0
        disk = sum(f.stat().st_size for f in path.iterdir())
        rows = {}
        for f in path.iterdir():
            table = f.name.split(".")[0]
            if f.suffix == ".parquet":
                import pyarrow.parquet as pq

                rows[table] = rows.get(table, 0) + pq.read_metadata(f).num_rows
        results = {
            "environment": timing.environment("cpu"),
            "args": vars(args),
            "run": {
                "bytes_on_disk": disk,
                "rows": rows,
                "write_s": round(write_s, 1),
                "compaction_after_close_s": round(waited, 1),
                "rows_per_s_written": None if reused else round(sum(rows.values()) / write_s),
            },
            "lazy": child("lazy", path, args.eager_cap_gb),
        }
        results["report"] = child("report", path, args.eager_cap_gb)
        print(*(json.dumps(results[k]) for k in ("run", "lazy", "report")), sep="\n")
        if args.eager:
            results["eager"] = child("eager", path, args.eager_cap_gb)
            print(json.dumps(results["eager"]))
        results["children_peak_rss_mb"] = (
            resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
        )
    finally:
        if not args.dir:
            shutil.rmtree(work, ignore_errors=True)
    print(timing.save(args.name, results))


if __name__ == "__main__":
    main()
