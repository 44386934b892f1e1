"""Training-step overhead of every-step telemetry, against the tools users run today.

Each variant trains its own copy of the model (same initial weights, same batches),
and the variants' steps are interleaved, so drifts hit them all alike; overhead is the
median over rounds of each round's ratio to ``none`` (with the quartiles of those ratios, the
noise). For torchvitals' variants, ``hook_ms`` is the median of the monitor's own
``torchvitals/hook_time`` scalar (training-thread time in its hooks and ``step()``; on a
GPU only the host side), and ``hook_%`` that time over the unmonitored step: a measure
that a noisy machine cannot blur, though it leaves out the writer thread. Variants:
``none``; ``torchvitals`` (every step: gradients, activations, histograms, scalars) and
``torchvitals-no-acts`` (the same without activation hooks) and ``torchvitals-acts/10``
(activations every 10th step);
``naive`` hooks (per-layer ``.norm().item()`` and ``torch.histc(...).cpu()``);
``wandb.watch(log="all", log_freq=1)`` offline and TensorBoard ``add_histogram``
per layer where those packages are installed.

    python benchmarks/bench_overhead.py                    # small CNN on CPU
    python benchmarks/bench_overhead.py --device cuda  # GPT-2 small, ResNet-50; bf16 autocast
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import os
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import models
import timing

import torchvitals
from torchvitals.store.schema import HOOK_TIME_SCALAR

HIST_RANGE = (-64.0, 16.0)


def naive_hooks(model: nn.Module) -> Callable[[], None]:
    """Per-layer logging as people write it: a host read per number, every step."""
    log: list[object] = []

    def on_forward(module, args, out):
        if isinstance(out, torch.Tensor):
            log.append(out.detach().float().norm().item())
            log.append(torch.histc(out.detach().float().abs().log2(), 80, *HIST_RANGE).cpu())

    for m in model.modules():
        if isinstance(m, (nn.ReLU, nn.GELU, nn.Linear, nn.Conv2d, nn.BatchNorm2d, nn.LayerNorm)):
            m.register_forward_hook(on_forward)

    def after_backward():
        for p in model.parameters():
            if p.grad is not None:
                log.append(p.grad.norm().item())
                log.append(torch.histc(p.grad.float().abs().log2(), 80, *HIST_RANGE).cpu())
        log.clear()

    return after_backward


def tensorboard_hooks(model: nn.Module, logdir: str) -> Callable[[], None] | None:
    """TensorBoard histograms of every weight and gradient, every step."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    writer = SummaryWriter(logdir)
    step = [0]

    def after_backward():
        for name, p in model.named_parameters():
            writer.add_histogram(f"{name}/weight", p, step[0])
            if p.grad is not None:
                writer.add_histogram(f"{name}/grad", p.grad, step[0])
        step[0] += 1

    return after_backward


def wandb_watch(model: nn.Module, logdir: str) -> bool:
    try:
        import wandb
    except ImportError:
        return False
    os.environ["WANDB_MODE"] = "offline"
    os.environ["WANDB_SILENT"] = "true"
    wandb.init(dir=logdir, project="torchvitals-bench", mode="offline")
    wandb.watch(model, log="all", log_freq=1)
    return True


def make_task(kind: str, device: str):
    """(model, batch, loss function, autocast dtype) for one benchmark model."""
    gen = torch.Generator().manual_seed(0)
    if kind == "small-cnn":
        torch.manual_seed(0)
        model = models.SmallCNN()
        x, y = torch.randn(64, 3, 32, 32, generator=gen), torch.randint(0, 10, (64,), generator=gen)
        return model, (x.to(device), y.to(device)), nn.functional.cross_entropy, None
    if kind == "resnet50":
        torch.manual_seed(0)
        model = models.ResNet50().to(memory_format=torch.channels_last)
        x = torch.randn(64, 3, 224, 224, generator=gen).to(memory_format=torch.channels_last)
        y = torch.randint(0, 1000, (64,), generator=gen)
        return model, (x.to(device), y.to(device)), nn.functional.cross_entropy, torch.bfloat16
    if kind == "gpt2-small":
        torch.manual_seed(0)
        model = models.GPT2Small()
        idx = torch.randint(0, 50257, (8, 1024), generator=gen)

        def lm_loss(logits, targets):
            return nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten())

        return model, (idx.to(device), idx.roll(-1, 1).to(device)), lm_loss, torch.bfloat16
    raise ValueError(f"unknown model {kind!r}")


def build_variants(
    kind: str, device: str, workdir: str, tools: bool
) -> tuple[dict[str, Callable[[], None]], dict[str, torchvitals.Monitor]]:
    base, (x, y), loss_fn, amp = make_task(kind, device)
    monitors: dict[str, torchvitals.Monitor] = {}  # by variant name

    def trainer(model, after_backward=None, monitor_name=None, **monitor_options):
        model = model.to(device)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.startswith("cuda"))
        mon = None
        if monitor_name is not None:
            path = os.path.join(workdir, kind, monitor_name.replace("/", "-"))
            mon = torchvitals.Monitor(model, path, optimizer=opt, **monitor_options)
            monitors[monitor_name] = mon
        hook = after_backward(model) if after_backward else None

        def step():
            with torch.autocast(device.split(":")[0], dtype=amp, enabled=amp is not None):
                loss = loss_fn(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if hook is not None:
                hook()
            opt.step()
            if mon is not None:
                mon.step(loss=loss)

        return step

    variants = {
        "none": trainer(copy.deepcopy(base)),
        "torchvitals": trainer(copy.deepcopy(base), monitor_name="torchvitals"),
        # the same without activations: what gradients, weights and scalars cost alone
        "torchvitals-no-acts": trainer(
            copy.deepcopy(base),
            monitor_name="torchvitals-no-acts",
            activations=False,
        ),
        # activations every 10th step, gradients every step
        "torchvitals-acts/10": trainer(
            copy.deepcopy(base),
            monitor_name="torchvitals-acts/10",
            act_every=10,
        ),
        "naive": trainer(copy.deepcopy(base), naive_hooks),
    }
    if tools:
        tb = trainer(
            copy.deepcopy(base), lambda m: tensorboard_hooks(m, os.path.join(workdir, "tb"))
        )
        if importlib.util.find_spec("tensorboard") is not None:
            variants["tensorboard"] = tb
        watched = copy.deepcopy(base).to(device)
        if wandb_watch(watched, workdir):
            variants["wandb.watch"] = trainer(watched)
    return variants, monitors


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--models", nargs="*", default=None)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--inner", type=int, default=3, help="steps per timed sample")
    parser.add_argument("--no-tools", action="store_true", help="skip wandb and TensorBoard")
    args = parser.parse_args()
    device = args.device
    kinds = args.models or (["small-cnn"] if device == "cpu" else ["gpt2-small", "resnet50"])
    rows = []
    with tempfile.TemporaryDirectory() as workdir:
        for kind in kinds:
            variants, monitors = build_variants(kind, device, workdir, tools=not args.no_tools)
            samples = timing.interleaved(
                variants, device=device, repeats=args.repeats, inner=args.inner
            )
            dropped, hook_ms = {}, {}
            for name, mon in monitors.items():
                mon.close()
                dropped[name] = mon.writer.dropped
                # What the monitor itself measured on the training thread, step by step.
                _, seconds = torchvitals.load_run(mon.writer.path).scalar(HOOK_TIME_SCALAR)
                hook_ms[name] = timing.median(seconds.tolist()) * 1e3
            base_ms = timing.median(samples["none"]) * 1e3
            for name, s in samples.items():
                q25, ratio, q75 = timing.ratio_quartiles(s, samples["none"])
                hook = hook_ms.get(name)
                rows.append(
                    {
                        "model": kind,
                        "variant": name,
                        "median_step_ms": round(timing.median(s) * 1e3, 2),
                        "overhead_%": round((ratio - 1) * 100, 2),
                        "overhead_iqr_%": f"{(q25 - 1) * 100:.1f}..{(q75 - 1) * 100:.1f}",
                        "hook_ms": "" if hook is None else round(hook, 2),
                        "hook_%": "" if hook is None else round(hook / base_ms * 100, 2),
                        "dropped_records": dropped.get(name, ""),
                    }
                )
    columns = ["model", "variant", "median_step_ms", "overhead_%", "overhead_iqr_%"]
    print(timing.table(rows, [*columns, "hook_ms", "hook_%", "dropped_records"]))
    env = timing.environment(device)
    tag = env.get("gpu", "cpu").replace(" ", "-") if device.startswith("cuda") else "cpu"
    print(f"saved {timing.save(f'overhead-{tag}', {'env': env, 'rows': rows})}")


if __name__ == "__main__":
    main()
