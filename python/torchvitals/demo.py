"""The demo: a small network that sits on a plateau, kicks in, then gains again when
the learning rate is cut, recorded by the Monitor, analysed, and reported. Pre-flight
checks run first, on a batch of their own, and are stored with the run.

The student is six tanh layers deep and starts with small weights, so the signal
through it (and the gradient back) nearly vanishes: the loss sits at ln(10) until the
weights grow out of that saddle, then drops sharply (kick-in) and settles on a floor
set by minibatch noise at a high learning rate. Three quarters of the way through,
the learning rate is cut tenfold and the loss falls to a lower floor. Every batch is
fresh (labels from a random linear teacher, 5% of them flipped), so nothing is
memorised and the floors are flat.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch import nn

from torchvitals.preflight import PreflightReport

STEPS = 4000
BATCH = 128
FEATURES = 32
CLASSES = 10
LABEL_NOISE = 0.05


def minibatches(seed: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Endless fresh minibatches labelled by a random linear teacher, with label noise."""
    gen = torch.Generator().manual_seed(seed)
    teacher = torch.randn(FEATURES, CLASSES, generator=gen)
    while True:
        x = torch.randn(BATCH, FEATURES, generator=gen)
        y = (x @ teacher).argmax(1)
        flip = torch.rand(BATCH, generator=gen) < LABEL_NOISE
        y[flip] = torch.randint(0, CLASSES, (int(flip.sum()),), generator=gen)
        yield x, y


def make_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    width = FEATURES
    for _ in range(6):
        layers += [nn.Linear(width, 128), nn.Tanh()]
        width = 128
    model = nn.Sequential(*layers, nn.Linear(width, CLASSES))
    with torch.no_grad():
        for m in model:
            if isinstance(m, nn.Linear):
                m.weight.mul_(0.35)  # start near the saddle at zero: a long plateau
                m.bias.zero_()
    return model


def train(
    out: str | Path,
    steps: int = STEPS,
    seed: int = 0,
    progress: Callable[[int, int], None] | None = None,
    on_preflight: Callable[[PreflightReport], None] | None = None,
) -> Path:
    """Runs the pre-flight checks (their report goes to ``on_preflight`` and into the run),
    then trains the demo model with a Monitor attached; returns the run directory."""
    from torchvitals import Monitor, preflight

    model = make_model(seed)
    opt = torch.optim.SGD(model.parameters(), lr=0.25, momentum=0.9)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, [steps * 3 // 4], gamma=0.1)
    data = minibatches(seed)
    with Monitor(model, out, optimizer=opt, weight_every=10, on_full="block") as mon:
        # preflight leaves the model, the optimizer and the RNGs as they were, and takes a
        # batch of its own: the recorded run is the same with it or without it.
        batch = next(minibatches(seed + 1))
        report = preflight(
            model, batch, nn.CrossEntropyLoss(), optimizer=opt, num_classes=CLASSES, monitor=mon
        )
        if on_preflight is not None:
            on_preflight(report)
        for step in range(steps):
            x, y = next(data)
            loss = nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            mon.step(loss=loss)
            sched.step()
            if progress is not None:
                progress(step + 1, steps)
    return Path(out)
