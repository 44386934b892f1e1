"""Statistics derived from the engine's columns, each defined once: every norm in the
telemetry (a layer's gradient norm, the global gradient norm on the device, on the
writer thread and across ranks) is ``norm(sum of squares)``."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from torchvitals.engine.contract import COUNT_KEYS, MOMENT_KEYS

SUMSQ = MOMENT_KEYS.index("sumsq")
NONFINITE = [COUNT_KEYS.index("nan"), COUNT_KEYS.index("inf")]


def norm(sumsq: Any) -> Any:
    """The L2 norm from a sum of squares, for a float, a numpy array or a torch tensor
    (which stays on its device: no sync)."""
    if isinstance(sumsq, (int, float)):
        return math.sqrt(sumsq)
    return sumsq.sqrt() if hasattr(sumsq, "sqrt") else np.sqrt(sumsq)


def gradient_totals(moments: Any, counts: Any) -> tuple[Any, Any]:
    """``(sum of squares, non-finite elements)`` over the rows of one engine call's
    ``moments`` and ``counts`` (numpy arrays or torch tensors alike)."""
    return moments[:, SUMSQ].sum(), counts[:, NONFINITE].sum()
