"""``initial_loss``: the loss at initialisation against ln C, the loss of a uniform guess
over C classes. Far above it, the outputs start too large (an output layer's scale or
initialisation); far below it, the model already knows the labels (a label leak, or
pretrained weights)."""

from __future__ import annotations

import math
from typing import Any

from torch import nn
from torch.nn import functional as F

from .report import Finding

# The thresholds of the analysis' initial_loss finding: outside [0.5, 1.5] x ln C is a
# warning, beyond 3x or below 0.2x critical.
LOW, HIGH = 0.5, 1.5
CRIT_LOW, CRIT_HIGH = 0.2, 3.0

_CLASSES = (nn.CrossEntropyLoss, nn.NLLLoss)
_BINARY = (nn.BCEWithLogitsLoss, nn.BCELoss)
_CLASSES_FN = (F.cross_entropy, F.nll_loss)
_BINARY_FN = (F.binary_cross_entropy_with_logits, F.binary_cross_entropy)


def reference_classes(loss_fn: Any, output: Any, num_classes: int | None) -> tuple[int | None, str]:
    """``(C, where it came from)``; ``C`` is None when it cannot be inferred, and the text
    then says why. Cross-entropy reads classes from dim 1 of its input (the last dim of an
    ``[N, C]`` output); a binary loss compares with ln 2."""
    if num_classes is not None:
        return num_classes, "num_classes"
    if loss_fn is None:
        return None, "a step_fn hides the model's output"
    name = getattr(loss_fn, "__name__", type(loss_fn).__name__)
    if isinstance(loss_fn, _CLASSES) or loss_fn in _CLASSES_FN:
        if not hasattr(output, "dim") or output.dim() == 0:
            return None, f"the model's output is not a tensor of class scores for {name}"
        dim = 1 if output.dim() >= 2 else 0
        return int(output.shape[dim]), f"the output's class dim ({dim})"
    if isinstance(loss_fn, _BINARY) or loss_fn in _BINARY_FN:
        return 2, f"{name} is binary"
    return None, f"{name} is not a known classification loss"


def initial_loss_finding(loss: float, classes: int | None, source: str) -> Finding:
    if not math.isfinite(loss):
        return Finding(
            "initial_loss",
            "critical",
            None,
            f"initial loss is {loss}: the forward already overflows or divides by zero",
            {"initial_loss": loss},
        )
    if classes is None or classes < 2:
        return Finding(
            "initial_loss",
            "info",
            None,
            f"initial loss {loss:.4g}; ln C cannot be inferred ({source}): pass num_classes= "
            "to compare",
            {"initial_loss": loss},
        )
    ref = math.log(classes)
    ratio = loss / ref
    evidence = {"initial_loss": loss, "ln_c": ref, "classes": classes, "ratio": ratio}
    against = f"ln({classes}) = {ref:.3g}"
    if ratio > HIGH:
        severity = "critical" if ratio > CRIT_HIGH else "warning"
        message = (
            f"initial loss {loss:.4g} is {ratio:.3g}x {against}: the outputs start too large "
            "(output layer scale / initialisation)"
        )
    elif ratio < LOW:
        severity = "critical" if ratio < CRIT_LOW else "warning"
        message = (
            f"initial loss {loss:.4g} is {ratio:.3g}x {against}: the model knows the labels "
            "before training (a label leak into the inputs, or pretrained weights)"
        )
    else:
        severity = "info"
        message = f"initial loss {loss:.4g} vs {against} (ratio {ratio:.3g}; C from {source})"
    return Finding("initial_loss", severity, None, message, evidence)
