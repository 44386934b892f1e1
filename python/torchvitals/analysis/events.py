"""The :class:`Event` record returned by :func:`torchvitals.analysis.detect_events`.

Severity is a string, one of ``"info"``, ``"warning"``, ``"critical"`` (ordered, see
:data:`SEVERITIES`); the numeric size of an event (effect size, z-score, recovery time...)
lives in ``evidence`` so that it keeps its units.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Any

SEVERITIES = ("info", "warning", "critical")

#: Loss-curve kinds.
CURVE_KINDS = (
    "plateau",
    "kick_in",
    "lr_drop",
    "lr_rise",
    "divergence",
    "spike",
    "outlier",
    "nonfinite",
)
#: Layer / run-configuration kinds.
LAYER_KINDS = (
    "dead_units",
    "saturation",
    "large_activations",
    "vanishing_gradient",
    "exploding_gradient",
    "weight_norm_growth",
    "initial_loss",
)
#: Kinds that get a ranked layer attribution.
ATTRIBUTED_KINDS = ("kick_in", "lr_drop", "lr_rise", "spike", "divergence")


def json_safe(v: Any) -> Any:
    """JSON-safe conversion (numpy scalars, NaN/Inf -> None, tuples -> lists)."""
    if isinstance(v, dict):
        return {str(k): json_safe(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [json_safe(x) for x in v]
    if hasattr(v, "item") and not isinstance(v, (str, bytes)):
        with contextlib.suppress(ValueError, AttributeError):
            v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


@dataclass
class Event:
    """One finding.

    Attributes:
        kind: one of :data:`CURVE_KINDS` or :data:`LAYER_KINDS`.
        step: first step of the event (onset).
        end_step: last step of the event (end of the transition / recovery / stretch).
        severity: ``"info"``, ``"warning"`` or ``"critical"``.
        cause: short human-readable explanation.
        evidence: numbers supporting the finding (effect sizes, levels, ratios, z-scores),
            and a few labels (``confidence``, ``origin_layer``, ``made_in``).
        layers: ranked attribution, a list of ``(layer, metric, change, lead_steps)`` (for
            an aggregated layer finding: the layers it involves, ``change`` its size there):
            ``change`` is a log-ratio for norms / LR / loss scale and a difference for
            fractions, ``lead_steps`` > 0 means the change happened before ``step``.
        layer: the layer a layer finding is about (``None`` for curve events).
        metric: the series the event was found on (e.g. ``"loss"``).
    """

    kind: str
    step: int
    end_step: int
    severity: str = "info"
    cause: str = ""
    evidence: dict[str, float] = field(default_factory=dict)
    layers: list[tuple[str, str, float, int]] = field(default_factory=list)
    layer: str | None = None
    metric: str = "loss"

    def __post_init__(self) -> None:
        if self.severity not in SEVERITIES:
            raise ValueError(f"severity must be one of {SEVERITIES}, got {self.severity!r}")
        self.step = int(self.step)
        self.end_step = int(self.end_step)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict."""
        return {
            "kind": self.kind,
            "step": self.step,
            "end_step": self.end_step,
            "severity": self.severity,
            "cause": self.cause,
            "evidence": json_safe(self.evidence),
            "layers": [
                {"layer": a, "metric": b, "change": json_safe(float(c)), "lead_steps": int(d)}
                for a, b, c, d in self.layers
            ],
            "layer": self.layer,
            "metric": self.metric,
        }

    def __str__(self) -> str:
        where = f" [{self.layer}]" if self.layer else ""
        return f"{self.kind}{where} @ {self.step}-{self.end_step} ({self.severity}): {self.cause}"
