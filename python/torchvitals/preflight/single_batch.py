"""Training on the one batch: the run ``cannot_overfit``, ``no_gradient`` and
``update_ratio`` read. It records, per parameter, whether a gradient ever arrived, was ever
non-zero or non-finite (the engine's sums of squares and NaN/Inf counts), the first
step's update, and whether the parameter moved at all."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from torchvitals.engine.op import tensor_stats

from .workbench import Workbench

#: The loss must fall below this fraction of its start for the model to count as able to
#: fit the batch.
OVERFIT_FRACTION = 0.1


@dataclass
class SingleBatchRun:
    names: list[str]  #: parameters that require grad
    losses: list[float] = field(default_factory=list)  #: each step's loss, before its update
    got_grad: list[bool] = field(default_factory=list)  #: a gradient arrived at some step
    nonzero: list[bool] = field(default_factory=list)  #: ... and was non-zero at some step
    nonfinite: list[bool] = field(default_factory=list)  #: ... held NaN/Inf at some step
    changed: list[bool] = field(default_factory=list)  #: differs from its initial value
    first_update_sq: list[float] = field(default_factory=list)  #: ||Δw||² of step 1
    init_sq: list[float] = field(default_factory=list)  #: ||w||² at initialisation
    optimizer: str = ""  #: e.g. "Adam(lr=0.001)"

    @property
    def reached_at(self) -> int | None:
        """The first step whose loss is below OVERFIT_FRACTION of the start, if any."""
        start = self.losses[0] if self.losses else 0.0
        if not start > 0:
            return None
        return next((i for i, v in enumerate(self.losses) if v <= OVERFIT_FRACTION * start), None)


def _grad_flags(grads: list[torch.Tensor]) -> tuple[list[bool], list[bool]]:
    """``(non-zero, non-finite)`` of each gradient, by one engine call per device."""
    nonzero, nonfinite = [False] * len(grads), [False] * len(grads)
    by_device: dict[int, list[int]] = {}
    for i, g in enumerate(grads):
        by_device.setdefault(g.get_device(), []).append(i)
    for idx in by_device.values():
        s = tensor_stats([grads[i] for i in idx])
        bad = (s["nan"] + s["inf"]).tolist()
        for i, b, zeros, n in zip(idx, bad, s["zeros"].tolist(), s["numel"].tolist(), strict=True):
            nonzero[i] = zeros < n  # NaN and Inf count as non-zero: they are reported apart
            nonfinite[i] = b > 0
    return nonzero, nonfinite


def run_single_batch(bench: Workbench, steps: int, min_steps: int) -> SingleBatchRun:
    """Trains from the initial state for up to ``steps`` steps with the user's optimizer
    settings; stops once the loss is below OVERFIT_FRACTION of its start and at least
    ``min_steps`` losses are recorded."""
    bench.reset()
    named = [(n, p) for n, p in bench.model.named_parameters() if p.requires_grad]
    run = SingleBatchRun(
        [n for n, _ in named],
        got_grad=[False] * len(named),
        nonzero=[False] * len(named),
        nonfinite=[False] * len(named),
        optimizer=bench.optimizer.describe(),
    )
    initial = [p.detach().clone() for _, p in named]
    run.init_sq = [float(w.double().square().sum()) for w in initial]

    def after_backward() -> None:
        idx = [i for i, (_, p) in enumerate(named) if p.grad is not None]
        grads = []
        for i in idx:
            g = named[i][1].grad
            grads.append(g.coalesce().values() if g.is_sparse else g)
        nonzero, nonfinite = _grad_flags(grads)
        for i, nz, nf in zip(idx, nonzero, nonfinite, strict=True):
            run.got_grad[i] = True
            run.nonzero[i] |= nz
            run.nonfinite[i] |= nf

    def after_step(i: int) -> None:
        if i == 0:
            run.first_update_sq = [
                float((p.detach() - w).double().square().sum())
                for (_, p), w in zip(named, initial, strict=True)
            ]

    def fitted(losses: list[float]) -> bool:
        start = losses[0]
        return len(losses) >= min_steps and start > 0 and min(losses) <= OVERFIT_FRACTION * start

    optimizer = bench.optimizer.build(bench.model)
    run.losses = bench.train(
        optimizer, steps, after_backward=after_backward, after_step=after_step, until=fitted
    )
    run.changed = [not torch.equal(p.detach(), w) for (_, p), w in zip(named, initial, strict=True)]
    return run
