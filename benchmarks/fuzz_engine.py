"""tensor_stats against the float64 reference on many more seeded random tensor lists
than CI runs (tests/reliability/test_tensor_fuzz.py): every dtype, empty and scalar
shapes, transposed, strided, overlapping, channels-last, offset, negated and conjugated
views, special values. Prints the counts; exits 1 on any wrong number.

    python benchmarks/fuzz_engine.py --seeds 8 --cases 5000    # 40,000 calls
    python benchmarks/fuzz_engine.py --device cuda             # the CUDA kernel
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "reliability"))
import tensor_fuzz


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=4)
    parser.add_argument("--first-seed", type=int, default=100)
    parser.add_argument("--cases", type=int, default=5000, help="calls per seed")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads of the engine")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.device != "cpu":
        check = tensor_fuzz.check_case

        def on_device(tensors, dims, sats):
            return check([t.to(args.device) for t in tensors], dims, sats)

        tensor_fuzz.check_case = on_device
    calls = tensors = 0
    failures: list[str] = []
    start = time.perf_counter()
    for seed in range(args.first_seed, args.first_seed + args.seeds):
        c, t, f = tensor_fuzz.fuzz(seed, args.cases)
        calls, tensors, failures = calls + c, tensors + t, failures + f
        print(f"seed {seed}: {c} calls, {t} tensors, {len(f)} wrong", flush=True)
    took = time.perf_counter() - start
    print(f"total: {calls} calls, {tensors} tensors, {len(failures)} wrong ({took:.0f} s)")
    for line in failures[:20]:
        print(line)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
