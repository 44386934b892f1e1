"""The demo: a small network that sits on a plateau, kicks in, then gains again when
the learning rate is cut, recorded by the Monitor, analysed, and reported.

The student starts with tiny weights, so the signal through its three tanh layers
(and the gradient back through them) nearly vanishes: the loss sits at ln(10) until
the weights grow out of that saddle, then drops sharply (kick-in). At a fixed step
the learning rate is cut tenfold, which lowers the floor set by minibatch noise.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

STEPS = 3000
LR_DROP_STEP = 2200
BATCH = 128
CLASSES = 10


def make_data(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and labels from a random teacher network, with 5% label noise."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(8192, 32, generator=gen)
    teacher = torch.randn(32, CLASSES, generator=gen)
    y = (x @ teacher).argmax(1)
    noisy = torch.rand(len(y), generator=gen) < 0.05
    y[noisy] = torch.randint(0, CLASSES, (int(noisy.sum()),), generator=gen)
    return x, y


def make_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Linear(32, 128), nn.Tanh(),
        nn.Linear(128, 128), nn.Tanh(),
        nn.Linear(128, 128), nn.Tanh(),
        nn.Linear(128, CLASSES),
    )  # fmt: skip
    with torch.no_grad():
        for m in model:
            if isinstance(m, nn.Linear):
                m.weight.mul_(0.06)  # start near the saddle at zero: a long plateau
                m.bias.zero_()
    return model


def train(out: str | Path, steps: int = STEPS, seed: int = 0, progress=None) -> Path:
    """Trains the demo model with a Monitor attached; returns the run directory."""
    from torchvitals import Monitor

    x, y = make_data(seed)
    model = make_model(seed)
    opt = torch.optim.SGD(model.parameters(), lr=0.25, momentum=0.9)
    drop_at = int(steps * LR_DROP_STEP / STEPS)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, [drop_at], gamma=0.1)
    gen = torch.Generator().manual_seed(seed + 1)
    with Monitor(model, out, optimizer=opt, weight_every=10) as mon:
        for step in range(steps):
            idx = torch.randint(0, len(x), (BATCH,), generator=gen)
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            mon.step(loss=loss)
            sched.step()
            if progress is not None:
                progress(step + 1, steps)
    return Path(out)
