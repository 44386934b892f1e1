"""Harder planted interventions, added to ``training_runs.PLANTED`` (the suite of
``benchmarks/planted.py``; a one-seed subset in ``test_planted_runs.py``).

Each builder takes ``(path, seed)``, varies its sizes with the seed, trains a small model on
CPU with the Monitor and returns the run directory and its truth (the keys of
:func:`training_runs.score`, plus ``names``: ``(layer, metric)`` pairs the matched event's
attribution must hold, and ``absent``: kinds that must not be reported beside it, since
they would be a second row for the same phenomenon).
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch
import training_runs as tr
from torch import nn

#: Hidden width by seed: the suite runs seeds 0, 1, 2 at three sizes.
WIDTH = {0: 64, 1: 32, 2: 128}


def _width(seed: int) -> int:
    return WIDTH[seed % 3]


def planted_kick_in_gradual(path, seed: int = 0, steps: int = 700):
    """A noisy plateau, then a gradual kick-in: regression (targets with noise, so every
    minibatch loss is ~25% noise) by a tanh network from a small init (x0.3) at a small
    LR. The network leaves the saddle at zero slowly, and its loss takes ~150 steps to
    fall. The true onset is read off the noise-free loss (on 1024 fixed examples), computed
    before every step: the first step where it has done a tenth of its fall (on log scale,
    from the median of the first 100 steps to that of the last 100). A gradual fall has
    no sharp knee; 2% below the plateau (the rule for the sharp planted kick-in) comes
    ~100 steps before anything shows through the minibatch noise."""
    torch.manual_seed(seed)
    h = _width(seed)
    model = nn.Sequential(
        nn.Linear(tr.FEATURES, h), nn.Tanh(), nn.Linear(h, h), nn.Tanh(), nn.Linear(h, 1),
    )  # fmt: skip
    with torch.no_grad():
        for m in model:
            if isinstance(m, nn.Linear):
                m.weight.mul_(0.3)
                m.bias.zero_()
    opt = torch.optim.SGD(model.parameters(), lr=0.0007, momentum=0.9)
    data = tr.regression(seed)
    full: list[float] = []

    def clean_loss(step: int) -> None:
        with torch.no_grad():
            full.append(float(nn.functional.mse_loss(model(data[0][:1024]), data[1][:1024])))

    tr.train(path, model, opt, steps, data, loss_fn=nn.functional.mse_loss, batch=32,
             on_step=clean_loss, order_seed=seed + 1)  # fmt: skip
    f = np.log(np.asarray(full))
    top, bottom = np.median(f[:100]), np.median(f[-100:])
    onset = int(np.flatnonzero(f < top - 0.1 * (top - bottom))[0])
    return Path(path), {"kind": "kick_in", "step": onset}


def planted_divergence_gradual(path, seed: int = 0, at: int = 200, steps: int = 500):
    """Adam with its LR ramped up 50-fold over 100 steps from ``at`` (a warm-up to a peak
    LR that is too high): the loss turns up part-way through the ramp and climbs slowly
    for ~100 steps, then stays high. The true onset is read off the loss: the last step
    before its final rise where the 21-step mean is within 10% of the rise of its best."""
    model = tr.mlp(seed, hidden=_width(seed), act=nn.Tanh)
    lr = 3e-3
    opt = torch.optim.Adam(model.parameters(), lr=lr)

    def ramp(step: int) -> None:
        if step >= at:
            for g in opt.param_groups:
                g["lr"] = lr * 50.0 ** min(1.0, (step - at + 1) / 100)

    tr.train(path, model, opt, steps, tr.classification(seed), on_step=ramp,
             order_seed=seed + 1)  # fmt: skip
    return Path(path), {"kind": "divergence", "step": "rise", "attribution": "lr"}


def planted_tanh_release(path, seed: int = 0, at: int = 300, steps: int = 500):
    """Saturation released by an LR drop: a tanh MLP by SGD at a high LR with weight
    decay. The LR's noise throws a fifth of the tanh inputs past saturation (the decay
    keeps the weights from growing, so the saturation is the noise's, not the norm's);
    the LR cut x0.1 at ``at`` releases them within ~50 steps and the loss falls. The
    attribution must name the saturation change of the tanh layer after the LR change."""
    torch.manual_seed(seed)
    h = _width(seed)
    model = nn.Sequential(OrderedDict([
        ("fc1", nn.Linear(tr.FEATURES, h)), ("tanh", nn.Tanh()),
        ("head", nn.Linear(h, tr.CLASSES)),
    ]))  # fmt: skip
    opt = torch.optim.SGD(model.parameters(), lr=0.8, momentum=0.9, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, [at], gamma=0.1)
    tr.train(path, model, opt, steps, tr.classification(seed), sched=sched,
             order_seed=seed + 1)  # fmt: skip
    truth = {"kind": "lr_drop", "step": at, "attribution": "lr"}
    return Path(path), {**truth, "names": [("tanh", "sat_frac")]}


def planted_adam_too_high(path, seed: int = 0):
    """``training_runs.planted_adam_too_high`` (LR x100 at ``DIVERGE_AT``), reported as
    one row: the LR rise is the divergence's cause, not an event of its own."""
    path, truth = tr.planted_adam_too_high(path, seed=seed)
    return path, {**truth, "absent": ("lr_rise",)}


PLANTED = {
    **tr.PLANTED,
    "adam_too_high": planted_adam_too_high,
    "tanh_release": planted_tanh_release,
    "kick_in_gradual": planted_kick_in_gradual,
    "divergence_gradual": planted_divergence_gradual,
}


def rise_onset(loss: np.ndarray) -> int:
    """The onset of a final rise of ``loss``: the last step before it where the 21-step
    centred mean is within 10% of the rise above its best (see
    :func:`planted_divergence_gradual`)."""
    m = np.convolve(loss, np.ones(21) / 21, mode="same")[10:-10]
    end = float(np.median(loss[-50:]))
    best = int(np.argmin(m))
    near = np.flatnonzero(m[: m.size - 25] <= m[best] + 0.1 * (end - m[best]))
    return int(near[-1]) + 10


def score(events, truths, loss) -> dict:
    """:func:`training_runs.score` with the truths' ``names`` and ``absent`` checked too."""
    truths = truths if isinstance(truths, list) else [truths]
    truths = [{**t, "step": rise_onset(loss)} if t.get("step") == "rise" else t for t in truths]
    out = tr.score(events, truths, loss)
    for t in truths:
        if not t.get("kind"):
            continue
        kinds = t["kind"] if isinstance(t["kind"], tuple) else (t["kind"],)
        step = t["step"] if t["step"] is not None else tr.true_kick_in_onset(loss)
        near = [e for e in events if e.kind in kinds and abs(e.step - step) <= tr.STEP_TOL]
        for layer, metric in t.get("names", ()):
            if not any((a, m) == (layer, metric) for e in near for a, m, *_ in e.layers):
                out["failures"].append(f"attribution without {metric} of {layer}: {near}")
        for e in events:
            if e.kind in t.get("absent", ()):
                out["kinds"].setdefault(kinds[0], [0, 0, 0])[1] += 1
                out["failures"].append(f"a second row for the same phenomenon: {e}")
    return out
