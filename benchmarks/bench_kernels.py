"""Fused statistics vs the best PyTorch combination vs naive per-tensor ops.

Tensor lists with the shapes of GPT-2 small (148 tensors, 124M elements) and
ResNet-50 (161 tensors, 25.6M elements), fp32 and bf16, and the small CNN's activations
(the outputs its Monitor hooks by default for a batch of 64: 12 tensors, 11M elements,
with dead-unit and saturation counts along dim 1, as the Monitor asks for). On a GPU the
bandwidth is also given as a fraction of the measured device-to-device copy bandwidth.

    python benchmarks/bench_kernels.py [--device cuda] [--repeats 15] [--lists ...]
"""

from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import models
import timing

import torchvitals

HIST_MIN, HIST_MAX = torchvitals.hist_edges().min_exp, torchvitals.hist_edges().max_exp + 1


def tensor_lists(device: str):
    """(name, dtype, tensors, engine options) of every benchmarked list."""
    for name, make in (("gpt2-small", models.GPT2Small), ("resnet50", models.ResNet50)):
        shapes = make()
        for dtype in (torch.float32, torch.bfloat16):
            yield name, dtype, models.parameter_list(shapes, dtype, device), {}
    torch.manual_seed(0)
    cnn, x = models.SmallCNN(), torch.randn(64, 3, 32, 32)
    for dtype in (torch.float32, torch.bfloat16):
        acts = [a.to(device) for a in models.activation_list(cnn, x, dtype)]
        yield "small-cnn-acts", dtype, acts, {"feature_dim": 1, "saturation": 6.0}


def torch_combination(tensors):
    """The best stock-PyTorch way to the same numbers: foreach kernels where they
    exist (norm, abs, max), one op per tensor where they do not."""
    norms = torch._foreach_norm(tensors)
    maxes = torch._foreach_max(torch._foreach_abs(tensors))
    nonfinite = [(~torch.isfinite(t)).sum() for t in tensors]
    hists = [
        torch.histc(t.abs().float().log2(), bins=HIST_MAX - HIST_MIN, min=HIST_MIN, max=HIST_MAX)
        for t in tensors
    ]
    return norms, maxes, nonfinite, hists


def naive(tensors):
    """What per-layer logging hooks usually do: one op and one host read per number."""
    out = []
    for t in tensors:
        h = torch.histc(
            t.abs().float().log2(), bins=HIST_MAX - HIST_MIN, min=HIST_MIN, max=HIST_MAX
        )
        out.append(
            (t.norm().item(), t.abs().max().item(), (~torch.isfinite(t)).sum().item(), h.cpu())
        )
    return out


def copy_bandwidth(device: str, repeats: int) -> float:
    """Bytes moved per second (read + write) by a 1 GiB device-to-device copy."""
    src = torch.empty(1 << 28, dtype=torch.float32, device=device).normal_()
    dst = torch.empty_like(src)
    seconds = timing.median(
        timing.interleaved({"copy": lambda: dst.copy_(src)}, device=device, repeats=repeats)["copy"]
    )
    return 2 * src.numel() * src.element_size() / seconds


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--skip-naive", action="store_true", help="leave out the slowest variant")
    parser.add_argument("--lists", nargs="*", default=None, help="only these lists (by name)")
    args = parser.parse_args()
    device = args.device
    copy_bw = copy_bandwidth(device, args.repeats) if device.startswith("cuda") else None

    rows = []
    for list_name, dtype, tensors, options in tensor_lists(device):
        if args.lists and list_name not in args.lists:
            continue
        nbytes = sum(t.numel() * t.element_size() for t in tensors)
        variants = {
            "torchvitals": functools.partial(torchvitals.tensor_stats, tensors, **options),
            "torch": functools.partial(torch_combination, tensors),
        }
        if not args.skip_naive:
            variants["naive"] = functools.partial(naive, tensors)
        samples = timing.interleaved(variants, device=device, repeats=args.repeats)
        ours = timing.median(samples["torchvitals"])
        for name, s in samples.items():
            t = timing.median(s)
            row = {
                "list": list_name,
                "dtype": str(dtype).replace("torch.", ""),
                "tensors": len(tensors),
                "elements": sum(x.numel() for x in tensors),
                "variant": name,
                "median_ms": round(t * 1e3, 3),
                "GB/s": round(nbytes / t / 1e9, 2),
                "vs_torchvitals": round(t / ours, 2),
            }
            if copy_bw:
                row["frac_of_copy_bw"] = round(nbytes / t / copy_bw, 3)
            rows.append(row)
        del tensors, variants
    columns = [
        "list",
        "dtype",
        "tensors",
        "elements",
        "variant",
        "median_ms",
        "GB/s",
        "vs_torchvitals",
    ]
    if copy_bw:
        columns.append("frac_of_copy_bw")
        print(f"device-to-device copy bandwidth: {copy_bw / 1e9:.1f} GB/s (read + write)")
    print(timing.table(rows, columns))
    env = timing.environment(device)
    tag = env.get("gpu", "cpu").replace(" ", "-") if device.startswith("cuda") else "cpu"
    path = timing.save(f"kernels-{tag}", {"env": env, "copy_bandwidth_Bps": copy_bw, "rows": rows})
    print(f"saved {path}")


if __name__ == "__main__":
    main()
