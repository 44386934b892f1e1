"""Which modules the Monitor hooks, and how each is measured: modules are picked by
role, not by a class list, so the activation functions and linear layers of other
libraries (transformers' ``Conv1D`` and ``*Activation`` classes, timm's activation
layers) are monitored like torch's own.

A module's role comes from, in order: torch's classes; a small registry of other
libraries' class names; a rule for the rest (a leaf module without parameters whose
class name names an activation function, such as ``QuickGELU`` or ``SquaredReLU``).
docs/module-roles.md has the table.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

from torch import nn

Role = Literal["rectifier", "bounded", "probabilities", "linear", "norm", "named"]

# Sigmoid and Tanh are measured on their input z: |z| >= 4.6 puts sigmoid(z) within
# 0.01 of 0 or 1, and |z| >= 2.65 puts |tanh(z)| above 0.99. Hardtanh and Hardsigmoid
# are flat exactly beyond |z| = 1 and |z| = 3.
SIGMOID_SATURATION = 4.6
TANH_SATURATION = 2.65
HARDTANH_SATURATION = 1.0
HARDSIGMOID_SATURATION = 3.0
SOFTMAX_SATURATION = 0.99  # a probability this close to 1 leaves almost no gradient
PREACTIVATION_SATURATION = 6.0  # beyond this GELU/SiLU are linear and sigmoid/tanh flat

RECTIFIERS = (
    nn.ReLU, nn.LeakyReLU, nn.GELU, nn.SiLU, nn.ReLU6, nn.ELU, nn.SELU, nn.CELU, nn.Mish,
    nn.Hardswish, nn.Softplus, nn.PReLU, nn.RReLU,
)  # fmt: skip
BOUNDED = {
    nn.Sigmoid: SIGMOID_SATURATION,
    nn.Tanh: TANH_SATURATION,
    nn.Hardtanh: HARDTANH_SATURATION,
    nn.Hardsigmoid: HARDSIGMOID_SATURATION,
}
PROBABILITIES = (nn.Softmax,)
LINEAR = (nn.Linear, nn.Bilinear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.MultiheadAttention)
NORMS = (
    nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.LayerNorm, nn.GroupNorm,
    *((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()),  # torch >= 2.4
)  # fmt: skip
#: The torch classes hooked by default; other libraries' modules are found by role.
DEFAULT_TYPES = RECTIFIERS + tuple(BOUNDED) + PROBABILITIES + LINEAR + NORMS
CHANNEL_FIRST = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)

#: Other libraries' classes, by class name.
REGISTRY: dict[str, Role] = {
    "Conv1D": "linear",  # transformers (GPT-2): a Linear with a transposed weight
    **dict.fromkeys(
        (
            "GELUActivation", "NewGELUActivation", "FastGELUActivation", "QuickGELUActivation",
            "AccurateGELUActivation", "GELUTanh", "PytorchGELUTanh", "ClippedGELUActivation",
            "SiLUActivation", "MishActivation", "ReLUSquaredActivation", "LaplaceActivation",
        ),
        "rectifier",
    ),  # transformers.activations
}  # fmt: skip
# Name fragments of activation functions for the rule (class name, lower case).
_RECTIFIER_WORDS = ("relu", "gelu", "silu", "swish", "mish", "elu", "softplus")
_NORM_SUFFIXES = ("rmsnorm", "layernorm")  # LlamaRMSNorm, T5LayerNorm, ...


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
    role: Role = "named"
    # The output is max(input, 0), a new tensor (torch's ReLU, not in place): the CPU engine
    # takes its statistics from the pass over the input when that is measured too.
    rectifies: bool = False

    @property
    def has_units(self) -> bool:
        """Whether per-unit counts (dead or saturated units) are measured: not on linear
        layers and norms, whose elements are only counted (``large``), so the engine
        skips the unit flags there. Their feature dim still guides the activation after."""
        return self.role not in ("linear", "norm")


def role_of(module: nn.Module) -> Role | None:
    """The module's role, or None when it is none the Monitor knows."""
    if isinstance(module, nn.Identity):
        return None
    if isinstance(module, RECTIFIERS):
        return "rectifier"
    if isinstance(module, tuple(BOUNDED)):
        return "bounded"
    if isinstance(module, PROBABILITIES):
        return "probabilities"
    if isinstance(module, LINEAR):
        return "linear"
    if isinstance(module, NORMS):
        return "norm"
    kind = type(module).__name__
    if kind in REGISTRY:
        return REGISTRY[kind]
    lower = kind.lower()
    if lower.endswith(_NORM_SUFFIXES):
        return "norm"
    leaf = next(module.children(), None) is None and next(module.parameters(), None) is None
    if leaf and any(word in lower for word in _RECTIFIER_WORDS):
        return "rectifier"
    return None


def _matches(name: str, patterns: Iterable[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def select_modules(
    model: nn.Module,
    types: tuple[type[nn.Module], ...] | None = None,
    include: Iterable[str] = (),
    exclude: Iterable[str] = (),
) -> list[tuple[nn.Module, HookSpec]]:
    """Modules to hook: those with a role (or, when ``types`` is given, the instances of
    ``types`` instead) and those whose name matches an ``include`` glob, minus those whose
    name matches an ``exclude`` glob. The root is never hooked."""
    include, exclude = tuple(include), tuple(exclude)
    chosen = []
    for name, module in model.named_modules():
        if not name or _matches(name, exclude):
            continue
        picked = role_of(module) is not None if types is None else isinstance(module, types)
        if picked or _matches(name, include):
            chosen.append((module, spec_for(name, module)))
    return chosen


def spec_for(name: str, module: nn.Module) -> HookSpec:
    kind = type(module).__name__
    role = role_of(module)
    if role == "bounded":
        threshold = next(t for cls, t in BOUNDED.items() if isinstance(module, cls))
        return HookSpec(name, kind, True, threshold, None, role=role)
    if role == "probabilities":
        return HookSpec(name, kind, False, SOFTMAX_SATURATION, False, role=role)
    if role in ("linear", "norm"):
        channel_first = isinstance(module, CHANNEL_FIRST)
        return HookSpec(name, kind, False, PREACTIVATION_SATURATION, channel_first, role=role)
    rectifies = type(module) is nn.ReLU and not module.inplace  # a subclass may differ
    return HookSpec(
        name, kind, False, None, None, counts_dead=True, role=role or "named", rectifies=rectifies
    )


def has_activation_function(specs: Iterable[HookSpec]) -> bool:
    return any(s.role in ("rectifier", "bounded", "probabilities") for s in specs)


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
