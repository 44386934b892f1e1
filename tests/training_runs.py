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
    monitor: dict | None = None,
) -> Path:
    """Minibatch training with the Monitor attached. ``on_step(step)`` runs before each
    step (e.g. to change the LR); ``corrupt(step, x, y)`` may replace the step's batch."""
    x, y = data
    gen = torch.Generator().manual_seed(order_seed)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: one thread is fastest, and deterministic
    try:
        # "block": under a loaded machine the writer may fall behind; never drop a step
        kw = {"weight_every": weight_every, "on_full": "block", **(monitor or {})}
        with Monitor(model, path, optimizer=opt, **kw) as mon:
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


# ------------------------------------------------------------- planted interventions
# Used by benchmarks/planted.py (three seeds, several sizes) and
# tests/analysis/test_planted_runs.py (one seed, small). Each builder returns the run
# directory and a dict with the truth: kind, step, layer (where one applies) and what the
# attribution must name.


class _Boom(nn.Module):
    """Identity, except at step ``at`` (counted in forwards): NaN in the forward output
    (``where="forward"``) or in the gradient its backward returns (``where="backward"``)."""

    def __init__(self, at: int, where: str):
        super().__init__()
        self.at, self.where, self.calls = at, where, 0

    def forward(self, x):
        k = self.calls
        self.calls += 1
        if k != self.at:
            return x
        if self.where == "forward":
            return x * float("nan")
        return _NanGrad.apply(x)


class _NanGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return g * float("nan")


def planted_nan(path, where: str = "forward", seed: int = 0, at: int = 120, steps: int = 160,
                act_grads: bool = True, hidden: int = 64):  # fmt: skip
    """fc1 -> relu -> boom -> fc2 -> tanh -> head; ``boom`` makes a NaN at step ``at``."""
    torch.manual_seed(seed)
    model = nn.Sequential(OrderedDict([
        ("fc1", nn.Linear(FEATURES, hidden)), ("relu", nn.ReLU()),
        ("boom", _Boom(at, where)), ("fc2", nn.Linear(hidden, hidden)), ("tanh", nn.Tanh()),
        ("head", nn.Linear(hidden, CLASSES)),
    ]))  # fmt: skip
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    mon = {"include": ["boom"], "act_grads": act_grads}
    train(path, model, opt, steps, classification(seed), order_seed=seed + 1, monitor=mon)
    layer = "boom" if (where == "forward" or act_grads) else "fc1"
    return Path(path), {"kind": "nonfinite", "step": at, "layer": layer}


def planted_dying_relu(path, seed: int = 0, at: int = 150, steps: int = 300, hidden: int = 64):
    """At step ``at`` three quarters of fc1's units get a bias of -100: their ReLUs die."""
    model = named_mlp(seed, names=("fc1", "relu", "head"), hidden=hidden)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)

    def kill(step):
        if step == at:
            with torch.no_grad():
                model.fc1.bias[: (3 * hidden) // 4] = -100.0

    train(path, model, opt, steps, classification(seed), on_step=kill, order_seed=seed + 1)
    return Path(path), {"kind": "dead_units", "step": at, "layer": "relu"}


def planted_adam_too_high(path, seed: int = 0, at: int = 200, steps: int = 400, factor=100.0):
    """Adam at a good LR, raised ``factor``-fold at ``at``: the loss rises and stays up."""
    lr_too_high(path, factor=factor, seed=seed)
    return Path(path), {"kind": "divergence", "step": DIVERGE_AT, "attribution": "lr"}


def planted_corrupt_batch(path, seed: int = 0, at: int = 200, steps: int = 400):
    """One batch of inputs x100 at ``at``: lasting damage (the loss stays raised for tens
    of steps), a spike of warning or worse, not an info outlier."""
    model = mlp(seed)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)

    def corrupt(step, x, y):
        return (x * 100.0, y) if step == at else (x, y)

    train(path, model, opt, steps, classification(seed), corrupt=corrupt, order_seed=seed + 1)
    return Path(path), {"kind": ("spike", "divergence"), "step": at, "min_severity": "warning"}


def planted_lr_schedule(path, seed: int = 0, drops=(150, 300, 450), steps: int = 600):
    """Regression by SGD with momentum near its largest stable LR, cut x0.3 at ``drops``."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(FEATURES, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, list(drops), gamma=0.3)
    train(path, model, opt, steps, regression(seed), loss_fn=nn.functional.mse_loss,
          sched=sched, batch=128, order_seed=seed + 1)  # fmt: skip
    return Path(path), [{"kind": "lr_drop", "step": d, "attribution": "lr"} for d in drops]


def planted_tanh_lr_drop(path, seed: int = 0, at: int = 300, steps: int = 500):
    """A tanh MLP by SGD at a high LR: its units saturate (the weights grow: sat_frac ~0.7
    to the end); the LR cut x0.1 at ``at`` lowers the minibatch noise and the loss falls.
    (Saturation released by an LR cut: ``tests/analysis/planted_cases.py`` tanh_release.)"""
    model = named_mlp(seed, names=("fc1", "tanh", "head"))
    model.tanh = nn.Tanh()
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, [at], gamma=0.1)
    train(path, model, opt, steps, classification(seed), sched=sched, order_seed=seed + 1)
    return Path(path), {"kind": "lr_drop", "step": at, "attribution": "lr"}


def planted_kick_in(path, seed: int = 0, steps: int = KICK_RUN):
    """Plateau then kick-in (tiny init); the true onset is read off the loss."""
    plateau_kick_in(path, seed=seed)
    return Path(path), {"kind": "kick_in", "step": None}


def planted_cosine(path, seed: int = 0, steps: int = 500):
    """A healthy run: ReLU MLP, AdamW, cosine schedule. Nothing warning-or-worse."""
    model = mlp(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    train(path, model, opt, steps, classification(seed), sched=sched, order_seed=seed + 1)
    return Path(path), {"kind": None}


PLANTED = {
    "dying_relu": planted_dying_relu,
    "tanh_lr_drop": planted_tanh_lr_drop,
    "adam_too_high": planted_adam_too_high,
    "nan_forward": lambda p, seed=0: planted_nan(p, "forward", seed),
    "nan_backward": lambda p, seed=0: planted_nan(p, "backward", seed),
    "nan_backward_grads_only": lambda p, seed=0: planted_nan(p, "backward", seed, act_grads=False),
    "corrupt_batch": planted_corrupt_batch,
    "kick_in": planted_kick_in,
    "lr_schedule": planted_lr_schedule,
    "healthy_cosine": planted_cosine,
}


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


# ------------------------------------------------------------------------ planted scoring
STEP_TOL = 50  # steps: onset tolerance on per-step curves
_SEV = {"info": 0, "warning": 1, "critical": 2}


def true_kick_in_onset(loss) -> int:
    """Where the loss leaves its initial plateau: the first step whose next-10 mean is below
    98% of the median of the first 100 steps."""
    import numpy as np

    mean = np.convolve(loss, np.ones(10) / 10, mode="valid")
    return int(np.flatnonzero(mean < 0.98 * np.median(loss[:100]))[0])


def score(events, truths, loss) -> dict:
    """Score one planted run: ``{"kinds": {kind: [tp, fp, fn]}, "errors": {kind: [...]},
    "failures": [...]}``. A truth matches an event of its kind within ``STEP_TOL`` steps
    that names its layer (when given), has the attribution asked for and the severity;
    events of a truth's kind that match nothing, and warning-or-worse events of any kind
    on a run without a truth, are false positives."""
    truths = truths if isinstance(truths, list) else [truths]
    out = {"kinds": {}, "errors": {}, "failures": []}
    used = set()
    for t in truths:
        if t["kind"] is None:
            bad = [e for e in events if _SEV[e.severity] >= 1]
            out["kinds"].setdefault("healthy", [0, 0, 0])[1] += len(bad)
            out["failures"] += [f"healthy run: {e}" for e in bad]
            continue
        kinds = t["kind"] if isinstance(t["kind"], tuple) else (t["kind"],)
        key = kinds[0]
        step = t["step"] if t["step"] is not None else true_kick_in_onset(loss)
        best = None
        for j, e in enumerate(events):
            if j in used or e.kind not in kinds or abs(e.step - step) > STEP_TOL:
                continue
            if t.get("layer"):
                named = {e.layer, e.evidence.get("origin_layer"), *(a for a, *_ in e.layers)}
                if e.kind == "nonfinite" and e.evidence.get("origin_layer") != t["layer"]:
                    continue
                if t["layer"] not in named:
                    continue
            if t.get("attribution") and not any(m == t["attribution"] for _, m, *_ in e.layers):
                continue
            if _SEV[e.severity] < _SEV[t.get("min_severity", "info")]:
                continue
            if best is None or abs(e.step - step) < abs(events[best].step - step):
                best = j
        cell = out["kinds"].setdefault(key, [0, 0, 0])
        if best is None:
            cell[2] += 1
            near = [str(e) for e in events if e.kind in kinds]
            out["failures"].append(f"missed {t} (true step {step}); of that kind: {near}")
        else:
            used.add(best)
            cell[0] += 1
            out["errors"].setdefault(key, []).append(abs(events[best].step - step))
    truth_kinds = {
        k
        for t in truths
        if t["kind"]
        for k in (t["kind"] if isinstance(t["kind"], tuple) else (t["kind"],))
    }
    for j, e in enumerate(events):
        if j in used or e.kind not in truth_kinds:
            continue
        if e.kind in ("lr_drop", "lr_rise") and e.evidence.get("confidence") == "none":
            continue
        key = next(
            t["kind"]
            for t in truths
            if t["kind"] and e.kind in (t["kind"] if isinstance(t["kind"], tuple) else (t["kind"],))
        )
        key = key[0] if isinstance(key, tuple) else key
        out["kinds"].setdefault(key, [0, 0, 0])[1] += 1
        out["failures"].append(f"false positive: {e}")
    return out
