"""What the curve detectors learned about a curve, shared with the attribution."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .series import Scale


@dataclass
class CurveContext:
    """What the detectors learned about the curve, reused by attribution."""

    step: np.ndarray  # steps of the finite points
    index: np.ndarray  # their indices in the caller's arrays
    y: np.ndarray  # log-badness
    scale: Scale
    sigma: float
    bounds: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    window: int = 0  # improvement window, coarse points
    coarse: np.ndarray = field(default_factory=lambda: np.zeros(0))
