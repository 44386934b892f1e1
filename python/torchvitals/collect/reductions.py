"""Engine calls of the current step: one fused call per device for each group of
same-kind tensors, kept until the step's record is assembled."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from torchvitals.engine.op import fused_stats


@dataclass
class Reduction:
    """One engine call's results (on the tensors' device) for a group of same-kind tensors."""

    kind: str
    names: list[str]
    moments: torch.Tensor
    counts: torch.Tensor
    hist: torch.Tensor
    # Per row, the module role of an activation (collect.selection.Role; None for
    # parameters): it says which counts measure something (record.py).
    roles: list[str | None] = field(default_factory=list)


class StepReductions:
    """The reductions of the current step, and those captured in a CUDA graph: hooks run
    once, at capture, and every replay rewrites their outputs, so they belong to every
    step that follows."""

    def __init__(self) -> None:
        self._pending: list[Reduction] = []
        self._captured: list[Reduction] = []

    def compute(
        self,
        kind: str,
        names: Sequence[str],
        tensors: Sequence[torch.Tensor],
        dims: Sequence[int | None] | None = None,
        thresholds: Sequence[float | None] | None = None,
        roles: Sequence[str | None] | None = None,
        rectified_of: Sequence[int | None] | None = None,
    ) -> list[Reduction]:
        """One fused engine call per device (parameters may live on several);
        ``rectified_of`` as :func:`~torchvitals.engine.op.fused_stats` takes it, by index
        into ``tensors``."""
        dims = dims or [None] * len(tensors)
        thresholds = thresholds or [None] * len(tensors)
        roles = roles or [None] * len(tensors)
        by_device: dict[int, list[int]] = {}  # by get_device(): -1 is the CPU
        for i, t in enumerate(tensors):
            by_device.setdefault(t.get_device(), []).append(i)
        out = []
        for idx in by_device.values():
            local = {i: k for k, i in enumerate(idx)}
            moments, counts, hist = fused_stats(
                [tensors[i] for i in idx],
                feature_dim=[dims[i] for i in idx],
                saturation=[thresholds[i] for i in idx],
                rectified_of=None
                if rectified_of is None
                else [local.get(rectified_of[i]) for i in idx],
            )
            names_ = [names[i] for i in idx]
            out.append(Reduction(kind, names_, moments, counts, hist, [roles[i] for i in idx]))
        return out

    def add(self, reductions: list[Reduction]) -> None:
        """Adds ``reductions`` to this step (called outside compiled code: Dynamo would
        guard on the list)."""
        self._pending.extend(reductions)
        if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
            self._captured.extend(reductions)

    def reduce(self, *args: Any, **kwargs: Any) -> None:
        """:meth:`compute`, then :meth:`add`."""
        self.add(self.compute(*args, **kwargs))

    def take(self) -> list[Reduction]:
        """This step's reductions, then the captured ones not among them; starts a new step."""
        pending = {id(r) for r in self._pending}
        captured = [r for r in self._captured if id(r) not in pending]
        taken, self._pending = self._pending + captured, []
        return taken

    def clear(self) -> None:
        self._pending.clear()
        self._captured.clear()
