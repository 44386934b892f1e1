"""Small models with one planted fault each, and the batch they are checked on.

Every model is a three-layer MLP on ``FEATURES`` inputs and ``CLASSES`` outputs (or a
variation of it), built from a fixed seed; the batch is labelled by a random linear
teacher, so a healthy model fits it in a few dozen Adam steps.
"""

from __future__ import annotations

import torch
from torch import nn

FEATURES = 32
CLASSES = 10
HIDDEN = 64
BATCH = 64


def batch(seed: int = 0, n: int = BATCH) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, FEATURES, generator=gen)
    teacher = torch.randn(FEATURES, CLASSES, generator=gen)
    return x, (x @ teacher).argmax(1)


def mlp(act: type[nn.Module] = nn.ReLU, seed: int = 0) -> nn.Sequential:
    """``0`` Linear, ``1`` act, ``2`` Linear, ``3`` act, ``4`` Linear (the output)."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(FEATURES, HIDDEN), act(), nn.Linear(HIDDEN, HIDDEN), act(),
        nn.Linear(HIDDEN, CLASSES),
    )  # fmt: skip


def healthy() -> nn.Module:
    return mlp()


def hot_output() -> nn.Module:
    """The output layer scaled x100: logits far too large at initialisation."""
    model = mlp()
    with torch.no_grad():
        model[4].weight.mul_(100)
        model[4].bias.mul_(100)
    return model


class DetachedBranch(nn.Module):
    """A second branch whose output is detached before it joins: no gradient reaches it."""

    def __init__(self) -> None:
        super().__init__()
        self.trunk = mlp()
        self.branch = nn.Linear(FEATURES, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.trunk(x) + self.branch(x).detach()


def dead_relu() -> nn.Module:
    """Hidden biases at -10: every ReLU unit is dead on every input."""
    model = mlp()
    with torch.no_grad():
        model[0].bias.fill_(-10.0)
        model[2].bias.fill_(-10.0)
    return model


def saturated_tanh() -> nn.Module:
    """Hidden weights x20: the tanh inputs sit far out on the flat tails."""
    model = mlp(nn.Tanh)
    with torch.no_grad():
        model[0].weight.mul_(20)
        model[2].weight.mul_(20)
    return model


class WrongSquare(torch.autograd.Function):
    """x² with a backward that forgets the factor 2."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x)
        return x * x

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (x,) = ctx.saved_tensors
        return grad * x


class Square(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return WrongSquare.apply(x)


def wrong_backward() -> nn.Module:
    """``0`` Linear, ``1`` Tanh, ``2`` Linear, ``3`` the wrong square, ``4`` Linear: the
    gradients of 0 and 2 are wrong, that of 4 is right."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(FEATURES, HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, HIDDEN), Square(),
        nn.Linear(HIDDEN, CLASSES),
    )  # fmt: skip
