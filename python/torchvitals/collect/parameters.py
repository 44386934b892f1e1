"""Gradient and weight collection: which parameters each optimizer steps, each gradient
read once per step (also across optimizers), through this rank's ``ParamPolicy``."""

from __future__ import annotations

import torch
from torch import nn

from torchvitals.collect.distributed import ParamPolicy
from torchvitals.collect.reductions import StepReductions


class ParameterReader:
    def __init__(
        self,
        model: nn.Module,
        optimizers: list[torch.optim.Optimizer],
        policy: ParamPolicy,
        reductions: StepReductions,
    ) -> None:
        self._model = model
        self._optimizers = optimizers
        self._policy = policy
        self._reductions = reductions
        self._names = {id(p): name for name, p in model.named_parameters()}
        self._seen: set[int] = set()  # parameters whose gradient this step has read

    def named(
        self, optimizer: torch.optim.Optimizer | None = None
    ) -> list[tuple[str, torch.Tensor]]:
        """Parameters of ``optimizer`` (default: of every optimizer, else of the model)."""
        optimizers = self._optimizers if optimizer is None else [optimizer]
        if not optimizers:
            return list(self._model.named_parameters())
        seen, out = set(), []
        for opt in optimizers:
            for group in opt.param_groups:
                for p in group["params"]:
                    if id(p) not in seen:  # tied parameters are counted once
                        seen.add(id(p))
                        out.append((self._names.get(id(p), f"param{len(out)}"), p))
        return out

    def read_gradients(self, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Gradients of ``optimizer``'s parameters not yet read this step."""
        names, grads = [], []
        for name, p in self.named(optimizer):
            if id(p) in self._seen:  # once per step, also across optimizers
                continue
            self._seen.add(id(p))
            g = p.grad
            if g is None:  # frozen, or not reached by this backward
                continue
            g = self._policy.local(p, g)
            if g is None:  # another rank records this parameter
                continue
            if g.is_sparse:
                g = g.coalesce().values()  # statistics of the stored values
            names.append(name)
            grads.append(g)
        if grads:
            self._reductions.reduce("grad", names, grads)

    def read_weights(self) -> None:
        named = []
        for name, p in self.named():
            w = self._policy.local(p, p.detach())
            if w is not None and w.layout == torch.strided:
                named.append((name, w))
        if named:
            self._reductions.reduce("weight", [n for n, _ in named], [w for _, w in named])

    def next_step(self) -> None:
        self._seen.clear()
