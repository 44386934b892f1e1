"""Small real training runs with known interventions, recorded by the Monitor.

Used by ``tests/analysis/test_detect_runs.py`` and ``tests/report/test_cli.py``. Every run
trains a small model on CPU, on one thread, on a fixed synthetic task, so it is
deterministic: the data, the initial weights and the minibatch order all come from seeded
generators. Each builder trains into a run directory and returns it; the step of its
intervention is a module constant. :func:`record` trains one and reads it back, with its
events, as a :class:`Recorded`.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from torchvitals import Monitor, detect_events, load_run
from torchvitals.analysis.runtables import series_from_run

CLASSES = 10
FEATURES = 32

Data = tuple[torch.Tensor, torch.Tensor]
Corrupt = Callable[[int, torch.Tensor, torch.Tensor], Data]


# --------------------------------------------------------------------------- tasks
def classification(
    seed: int = 0, n: int = 4096, noise: float = 0.05, orthogonal: bool = False
) -> Data:
    """Labels of a random linear teacher, a fraction ``noise`` of them replaced at random.
    ``orthogonal``: the label is the largest of the first ``CLASSES`` inputs (a teacher
    whose directions all have the same strength, so a network learns them all at once)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, FEATURES, generator=gen)
    teacher = torch.randn(FEATURES, CLASSES, generator=gen)
    if orthogonal:
        teacher = torch.eye(FEATURES, CLASSES)
    y = (x @ teacher).argmax(1)
    flip = torch.rand(n, generator=gen) < noise
    y[flip] = torch.randint(0, CLASSES, (int(flip.sum()),), generator=gen)
    return x, y


def regression(seed: int = 0, n: int = 4096, noise: float = 0.5) -> Data:
    """``y = x @ w + noise``: the best possible mean squared error is ``noise**2``."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, FEATURES, generator=gen)
    w = torch.randn(FEATURES, 1, generator=gen) / FEATURES**0.5
    return x, x @ w + noise * torch.randn(n, 1, generator=gen)


# --------------------------------------------------------------------------- loop
def train(
    path: str | Path,
    model: nn.Module,
    opt: torch.optim.Optimizer,
    steps: int,
    data: Data,
    *,
    loss_fn: Callable = nn.functional.cross_entropy,
    sched=None,
    batch: int = 64,
    corrupt: Corrupt | None = None,
    on_step: Callable[[int], None] | None = None,
    order_seed: int = 1,
    weight_every: int = 10,
) -> Path:
    """Minibatch training with the Monitor attached. ``on_step(step)`` runs before each
    step (e.g. to change the LR); ``corrupt(step, x, y)`` may replace the step's batch."""
    x, y = data
    gen = torch.Generator().manual_seed(order_seed)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: one thread is fastest, and deterministic
    try:
        # "block": under a loaded machine the writer may fall behind; never drop a step
        with Monitor(model, path, optimizer=opt, weight_every=weight_every, on_full="block") as mon:
            for step in range(steps):
                if on_step is not None:
                    on_step(step)
                idx = torch.randint(0, len(x), (batch,), generator=gen)
                xb, yb = x[idx], y[idx]
                if corrupt is not None:
                    xb, yb = corrupt(step, xb, yb)
                loss = loss_fn(model(xb), yb)
                opt.zero_grad()
                loss.backward()
                opt.step()
                mon.step(loss=loss)
                if sched is not None:
                    sched.step()
    finally:
        torch.set_num_threads(threads)
    return Path(path)


def mlp(seed: int, hidden: int = 64, act: type[nn.Module] = nn.ReLU, out: int = CLASSES):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(FEATURES, hidden), act(), nn.Linear(hidden, out))


# --------------------------------------------------------------------------- runs
LR_STEP_RUN = 400
LR_STEP_AT = 250


def lr_step(path, seed: int = 1) -> Path:
    """Linear regression by minibatch SGD with momentum at an LR close to the largest
    stable one: gradient noise keeps the loss well above its floor (``noise**2``) until
    the LR is cut tenfold at ``LR_STEP_AT``, when it falls to near the floor in a few
    steps."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(FEATURES, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, [LR_STEP_AT], gamma=0.1)
    data = regression(seed)
    return train(
        path, model, opt, LR_STEP_RUN, data, loss_fn=nn.functional.mse_loss, sched=sched,
        batch=128, order_seed=seed + 1,
    )  # fmt: skip


DIVERGE_RUN = 400
DIVERGE_AT = 200


def lr_too_high(path, factor: float = 100.0, seed: int = 0, lr: float = 3e-3) -> Path:
    """A tanh MLP classifier trains well with Adam at LR ``lr`` until the LR is raised
    ``factor``-fold at ``DIVERGE_AT``: the weights are thrown far out, the tanh units and
    the logits saturate, and the loss climbs several-fold and stays there to the end.
    (With ReLU units the same shock kills most units and the loss falls back towards
    ln(10) instead.)"""
    model = mlp(seed, act=nn.Tanh)
    opt = torch.optim.Adam(model.parameters(), lr=lr)

    def raise_lr(step: int) -> None:
        if step == DIVERGE_AT:
            for group in opt.param_groups:
                group["lr"] *= factor

    data = classification(seed)
    return train(path, model, opt, DIVERGE_RUN, data, on_step=raise_lr, order_seed=seed + 1)


CORRUPT_RUN = 400
CORRUPT_ONE_AT = 180  # one corrupted batch
CORRUPT_AT = 280  # CORRUPT_LEN consecutive corrupted batches
CORRUPT_LEN = 5


def corrupted_batches(
    path, how: str = "labels", seed: int = 0, length: int = CORRUPT_LEN, one: bool = True
) -> Path:
    """A ReLU MLP classifier trained by SGD; the batch at ``CORRUPT_ONE_AT`` (if ``one``)
    and the ``length`` batches from ``CORRUPT_AT`` on are corrupted: labels shuffled within
    the batch (``how="labels"``) or inputs scaled x100 (``how="scale"``)."""
    model = mlp(seed)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    gen = torch.Generator().manual_seed(seed + 2)

    def corrupt(step, x, y):
        if (one and step == CORRUPT_ONE_AT) or CORRUPT_AT <= step < CORRUPT_AT + length:
            if how == "labels":
                return x, y[torch.randperm(len(y), generator=gen)]
            return x * 100.0, y
        return x, y

    data = classification(seed)
    return train(path, model, opt, CORRUPT_RUN, data, corrupt=corrupt, order_seed=seed + 1)


NAN_RUN = 200
NAN_AT = 150


def named_mlp(seed: int, names=("stem", "act", "head"), hidden: int = 64) -> nn.Module:
    """The MLP of :func:`mlp` with its modules named, in forward order, ``names``."""
    torch.manual_seed(seed)
    layers = (nn.Linear(FEATURES, hidden), nn.ReLU(), nn.Linear(hidden, CLASSES))
    return nn.Sequential(OrderedDict(zip(names, layers, strict=True)))


def nan_input(path, seed: int = 0) -> Path:
    """One NaN in one input of the batch at ``NAN_AT``: the loss, every gradient and, after
    the update, every weight become NaN. The modules are named so that forward order
    (stem, act, head) differs from alphabetical order."""
    model = named_mlp(seed)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)

    def corrupt(step, x, y):
        if step == NAN_AT:
            x = x.clone()
            x[0, 0] = float("nan")
        return x, y

    data = classification(seed)
    return train(path, model, opt, NAN_RUN, data, corrupt=corrupt, order_seed=seed + 1)


KICK_RUN = 600


def plateau_kick_in(
    path,
    seed: int = 0,
    scale: float = 0.15,
    lr: float = 0.1,
    batch: int = 256,
    orthogonal: bool = True,
) -> Path:
    """Three tanh layers with small initial weights (x``scale``): the signal and its
    gradient nearly vanish, the loss sits at ln(10) until the weights grow out of the
    saddle at zero, then drops."""
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Linear(FEATURES, 64), nn.Tanh(),
        nn.Linear(64, 64), nn.Tanh(),
        nn.Linear(64, 64), nn.Tanh(),
        nn.Linear(64, CLASSES),
    )  # fmt: skip
    with torch.no_grad():
        for m in model:
            if isinstance(m, nn.Linear):
                m.weight.mul_(scale)
                m.bias.zero_()
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    data = classification(seed, orthogonal=orthogonal)
    return train(path, model, opt, KICK_RUN, data, batch=batch, order_seed=seed + 1)


DEAD_RUN = 200
DEAD_UNITS = 48  # of 64 hidden units
HOSTILE = "relu<script>alert(1)</script>"  # a module name that must be escaped in HTML


def dead_units_hot_logits(path, seed: int = 0, logit_scale: float = 50.0) -> Path:
    """A ReLU MLP whose first layer has a bias of -100 on ``DEAD_UNITS`` of its units (they
    never activate, so get no gradient and stay dead), and whose output weights are scaled
    by ``logit_scale`` (the first loss is far above ln(10)). The ReLU module is registered
    under the hostile name ``HOSTILE``."""
    model = named_mlp(seed, names=("fc1", HOSTILE, "head"))
    with torch.no_grad():
        model.fc1.bias[:DEAD_UNITS] = -100.0
        model.head.weight.mul_(logit_scale)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    data = classification(seed)
    return train(path, model, opt, DEAD_RUN, data, order_seed=seed + 1)


# --------------------------------------------------------------------------- read back
class Recorded:
    """A run trained once per module, read back, with its events."""

    def __init__(self, path, num_classes=None):
        self.path = path
        self.run = load_run(path)
        self.step, self.loss, self.lr, self.series = series_from_run(self.run)
        self.events = detect_events(self.run, num_classes=num_classes)

    def __repr__(self):  # shown by pytest when an assertion fails
        return "\n".join(str(e) for e in self.events)


def record(factory, build, name, num_classes=None, **kwargs) -> Recorded:
    """Trains ``build(path, **kwargs)`` into a fresh directory of ``factory`` (pytest's
    ``tmp_path_factory``) and reads it back."""
    path = factory.mktemp(name) / "run"
    build(path, **kwargs)
    return Recorded(path, num_classes)
