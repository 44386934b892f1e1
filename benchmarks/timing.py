"""The one timing helper every benchmark uses: interleaved runs, medians, metadata.

Interleaving (A, B, C, A, B, C, ...) spreads drifts of clock, temperature and
background load evenly over the variants being compared.
"""

from __future__ import annotations

import json
import platform
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import torch

import torchvitals

RESULTS = Path(__file__).resolve().parent / "results"


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def interleaved(
    variants: dict[str, Callable[[], object]],
    *,
    device: str = "cpu",
    repeats: int = 15,
    warmup: int = 2,
    inner: int = 1,
) -> dict[str, list[float]]:
    """Seconds per call of each variant, ``repeats`` samples each, taken round-robin.

    Each sample times ``inner`` back-to-back calls (GPU: between CUDA events, so host
    overhead that the GPU hides is not counted twice) and divides by ``inner``.
    """
    for fn in variants.values():
        for _ in range(warmup):
            fn()
    _sync(device)
    samples: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(repeats):
        for name, fn in variants.items():
            if device.startswith("cuda"):
                start, end = (
                    torch.cuda.Event(enable_timing=True),
                    torch.cuda.Event(enable_timing=True),
                )
                start.record()
                for _ in range(inner):
                    fn()
                end.record()
                end.synchronize()
                samples[name].append(start.elapsed_time(end) / 1e3 / inner)
            else:
                t0 = time.perf_counter()
                for _ in range(inner):
                    fn()
                samples[name].append((time.perf_counter() - t0) / inner)
    return samples


def median(samples: list[float]) -> float:
    return statistics.median(samples)


def ratio_quartiles(samples: list[float], baseline: list[float]) -> tuple[float, float, float]:
    """Quartiles (25%, median, 75%) of the per-round ratios ``samples[i] / baseline[i]``: each
    ratio compares runs taken back to back, so a slow patch of the machine cancels out of
    it, and the spread says how far the median can be trusted."""
    ratios = [s / b for s, b in zip(samples, baseline, strict=True)]
    q25, median, q75 = statistics.quantiles(ratios, n=4)
    return q25, median, q75


def environment(device: str) -> dict[str, object]:
    """What a result must carry to be comparable: device, driver, versions, commit."""
    here = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True, cwd=here
        ).stdout.strip()
        # Changes to tracked files not yet committed: the result is not that commit's.
        changed = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            capture_output=True, text=True, check=True, cwd=here,
        ).stdout.strip()  # fmt: skip
        if changed:
            commit += "+uncommitted"
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    env: dict[str, object] = {
        "device": device,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "cpu_kernel": torchvitals._C.cpu_isa(),
        "commit": commit,
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    if device.startswith("cuda"):
        env["gpu"] = torch.cuda.get_device_name()
        env["cuda"] = torch.version.cuda
        try:
            env["driver"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                capture_output=True, text=True, check=True,
            ).stdout.strip()  # fmt: skip
        except (OSError, subprocess.CalledProcessError):
            env["driver"] = "unknown"
    return env


def save(name: str, payload: dict) -> Path:
    """Writes ``payload`` under benchmarks/results/ and returns the path."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")
    return path


def table(rows: list[dict[str, object]], columns: list[str]) -> str:
    """A plain fixed-width table (benchmarks print, they do not depend on rich)."""
    cells = [[str(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join(lines)
