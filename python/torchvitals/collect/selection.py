"""Which modules the Monitor hooks, and how each kind of activation is measured."""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable
from dataclasses import dataclass

from torch import nn

# Sigmoid and Tanh are measured on their input z: |z| >= 4.6 puts sigmoid(z) within
# 0.01 of 0 or 1, and |z| >= 2.65 puts |tanh(z)| above 0.99.
SIGMOID_SATURATION = 4.6
TANH_SATURATION = 2.65
SOFTMAX_SATURATION = 0.99  # a probability this close to 1 leaves almost no gradient
PREACTIVATION_SATURATION = 6.0  # beyond this GELU/SiLU are linear and sigmoid/tanh flat

ACTIVATIONS = (nn.ReLU, nn.LeakyReLU, nn.GELU, nn.SiLU, nn.ReLU6, nn.ELU)
SATURATING = {nn.Sigmoid: SIGMOID_SATURATION, nn.Tanh: TANH_SATURATION}
PROBABILITIES = (nn.Softmax,)
LAYERS = (
    nn.Linear,
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.BatchNorm3d,
    nn.LayerNorm,
    nn.GroupNorm,
)
# RMSNorm exists from torch 2.4 on.
LAYERS += (nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()
DEFAULT_TYPES = ACTIVATIONS + tuple(SATURATING) + PROBABILITIES + LAYERS
CHANNEL_FIRST = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


@dataclass(frozen=True)
class HookSpec:
    """How one module's activation is measured."""

    name: str
    module_type: str
    of_input: bool  # measure the module's input (pre-activation) instead of its output
    saturation: float | None
    channel_first: bool | None  # True: units along dim 1; False: last dim; None: by shape
    # "Never positive" means a dead unit only after a rectifier (or a module picked by
    # name); on a pre-activation, a sigmoid/tanh input or a softmax it means nothing.
    counts_dead: bool = False


def _matches(name: str, patterns: Iterable[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def select_modules(
    model: nn.Module,
    types: tuple[type[nn.Module], ...] = DEFAULT_TYPES,
    include: Iterable[str] = (),
    exclude: Iterable[str] = (),
) -> list[tuple[nn.Module, HookSpec]]:
    """Modules to hook: instances of ``types`` or whose name matches an ``include``
    glob, minus those whose name matches an ``exclude`` glob. The root is never hooked."""
    include, exclude = tuple(include), tuple(exclude)
    chosen = []
    for name, module in model.named_modules():
        if not name:
            continue
        if not (isinstance(module, types) or _matches(name, include)) or _matches(name, exclude):
            continue
        chosen.append((module, spec_for(name, module)))
    return chosen


def spec_for(name: str, module: nn.Module) -> HookSpec:
    kind = type(module).__name__
    for cls, threshold in SATURATING.items():
        if isinstance(module, cls):
            return HookSpec(name, kind, True, threshold, None)
    if isinstance(module, PROBABILITIES):
        return HookSpec(name, kind, False, SOFTMAX_SATURATION, False)
    if isinstance(module, CHANNEL_FIRST):
        return HookSpec(name, kind, False, PREACTIVATION_SATURATION, True)
    if isinstance(module, LAYERS):
        return HookSpec(name, kind, False, PREACTIVATION_SATURATION, False)
    return HookSpec(name, kind, False, None, None, counts_dead=True)


def feature_dim(spec: HookSpec, ndim: int, previous: tuple[int, int] | None) -> int | None:
    """Dim holding the units: dim 1 for channel-first layers, the last dim for
    ``[..., F]`` layers. Activations follow the hooked layer just before them when its
    output had the same rank (``previous`` is its ``(ndim, dim)``), else 4-d and 5-d
    tensors count as NCHW/NCDHW and the rest as ``[..., F]``."""
    if ndim == 0:
        return None
    if spec.channel_first is True:
        return 1 if ndim >= 2 else 0
    if spec.channel_first is False:
        return ndim - 1
    if previous is not None and previous[0] == ndim:
        return previous[1]
    return 1 if ndim >= 4 else ndim - 1
