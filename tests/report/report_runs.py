"""Runs the HTML report is tested and measured on: the demo, shortened, and a residual
MLP 75 blocks deep (about 300 layers), each recorded by the Monitor."""

from __future__ import annotations

from pathlib import Path

import torch
import training_runs as tr
from torch import nn

DEPTH = 75
DEAD_BLOCKS = range(10, 20)  # their ReLU never fires: the dead-unit heatmap has something


class Block(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.fc = nn.Linear(width, width)
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.act(self.fc(x))


class Deep(nn.Module):
    """``inp``, ``blocks.0`` ... ``blocks.{depth-1}`` (``fc``, ``act``), ``head``: four
    recorded layers per block (``fc.weight``, ``fc.bias``, ``fc``, ``act``)."""

    def __init__(self, depth: int = DEPTH, width: int = 8) -> None:
        super().__init__()
        self.inp = nn.Linear(tr.FEATURES, width)
        self.blocks = nn.ModuleList(Block(width) for _ in range(depth))
        self.head = nn.Linear(width, tr.CLASSES)
        with torch.no_grad():
            for i, block in enumerate(self.blocks):
                block.fc.weight.mul_(0.05)  # small residual branches: 75 deep stays finite
                if i in DEAD_BLOCKS:
                    block.fc.bias.fill_(-50.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.inp(x)
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def deep_run(path: str | Path, steps: int = 30, depth: int = DEPTH) -> Path:
    """A few SGD steps of :class:`Deep` with every statistic and histogram recorded."""
    torch.manual_seed(0)
    model = Deep(depth)
    opt = torch.optim.SGD(model.parameters(), lr=0.02)
    data = tr.classification(0, n=512)
    return tr.train(path, model, opt, steps, data, batch=32, weight_every=5)


def demo_run(path: str | Path, steps: int = 300) -> Path:
    """The demo (pre-flight checks, then the tanh network), ``steps`` long."""
    from torchvitals import demo

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return demo.train(path, steps=steps)
    finally:
        torch.set_num_threads(threads)
