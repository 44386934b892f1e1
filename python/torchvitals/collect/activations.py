"""Activation capture: forward hooks stash the hooked modules' activations and the root
module's forward hook reduces them in one engine call; backward hooks stash activation
gradients, reduced with the step's gradients."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from torchvitals.collect.distributed import is_dtensor
from torchvitals.collect.reductions import Reduction, StepReductions
from torchvitals.collect.selection import HookSpec, feature_dim
from torchvitals.engine.dispatch import rectifiable


def first_tensor(value: Any) -> torch.Tensor | None:
    """The tensor a module's input or output stands for: itself, or the first element of
    a tuple or list (``nn.MultiheadAttention``, recurrent layers); None for anything else
    (a dict or a ``ModelOutput`` has no first tensor that is clearly the activation)."""
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (tuple, list)) and value and isinstance(value[0], torch.Tensor):
        return value[0]
    return None


def measurable(x: torch.Tensor) -> torch.Tensor | None:
    """``x`` as the engine can read it: a DTensor (tensor parallel) through its local
    shard; None for what has no dense floating-point data (integer, nested, sparse)."""
    if is_dtensor(x):
        x = x.to_local()
    if not x.is_floating_point() or x.layout != torch.strided or x.is_nested:
        return None
    return x


class ActivationCapture:
    """What the hooks of one model collect between two ``Monitor.step()`` calls."""

    def __init__(
        self,
        model: nn.Module,
        reductions: StepReductions,
        *,
        act_every: int,
        grad_every: int,
        warn_once: Callable[[str, str], None],
    ) -> None:
        self._model = model
        self._reductions = reductions
        self._act_every = act_every
        self._grad_every = grad_every
        self._warn_once = warn_once
        self.step = 0  # the Monitor's step count
        # (spec, activation, its version, the input of a rectifier: see HookSpec.rectifies)
        self._stash: list[tuple[HookSpec, torch.Tensor, int | None, Any]] = []
        self._reduce_in_hook: set[str] = set()  # modules whose output is changed in place
        self._grad_stash: dict[str, torch.Tensor] = {}  # by module, in backward order
        self._recording = False
        self._done = False
        self._compiled: list[Reduction] = []  # the last compiled forward's activations
        self._explicit = False  # begin_forward() called by the user, not by the model

    def begin_forward(self, explicit: bool = False) -> None:
        if torch.compiler.is_compiling():
            # Traced code must read no state that changes from step to step: Dynamo would
            # guard on it and recompile. Compiled forwards always record; step() keeps what
            # the cadence asks for.
            self._stash = []
            return
        if self._explicit and not explicit:
            return  # the model's own forward, inside the user's begin_forward()
        # A forward still recording here raised before its end: what it stashed is
        # discarded, never merged into this one.
        self._stash.clear()
        self._explicit = explicit
        self._recording = (
            self._model.training
            and not self._done
            and self.step % self._act_every == 0
            and torch.is_grad_enabled()
        )

    def activation_hook(self, spec: HookSpec) -> Callable:
        def on_forward(module: nn.Module, args: Any, output: Any) -> None:
            compiling = torch.compiler.is_compiling()
            if not (self._training() if compiling else self._recording):
                return
            value = args if spec.of_input else output
            x = first_tensor(value)
            if x is not None:
                x = measurable(x)
            if x is None:
                self._warn_once(
                    f"unmeasured:{spec.name}",
                    f"torchvitals: the {'input' if spec.of_input else 'output'} of "
                    f"{spec.name!r} ({type(value).__name__}) holds no dense floating-point "
                    "tensor to measure; it is skipped",
                )
                return
            # (Compiled graphs functionalize in-place ops: the stashed value is the hook's.)
            if not compiling and spec.name in self._reduce_in_hook:  # overwritten later
                dim = feature_dim(spec, x.dim(), None) if spec.has_units else None
                self._reductions.reduce("act", [spec.name], [x], [dim], [spec.saturation],
                                        [spec.role])  # fmt: skip
            else:
                # An in-place op later bumps the version. (Compiled graphs functionalize
                # in-place ops; their versions mean nothing.)
                version = None if compiling else x._version
                self._stash.append((spec, x, version, self._measured_input(spec, args)))

        on_forward.__name__ = "activation hook"
        return on_forward

    def _measured_input(self, spec: HookSpec, args: Any) -> torch.Tensor | None:
        """A ReLU's input when it is the activation stashed just before (Conv-BN-ReLU,
        Linear-ReLU): the engine then derives the ReLU's statistics from that one's pass.
        Any other input is not kept: it would stay alive until the forward's end."""
        if not spec.rectifies or not self._stash or torch.compiler.is_compiling():
            return None
        previous = self._stash[-1][1]
        return previous if first_tensor(args) is previous else None

    def gradient_hook(self, name: str) -> Callable:
        def on_backward(module: nn.Module, grad_input: Any, grad_output: Any) -> None:
            g = first_tensor(grad_output)
            # Under gradient accumulation only the step's first backward is kept.
            seen = name in self._grad_stash
            if g is not None and not seen and self.step % self._grad_every == 0:
                self._grad_stash[name] = g.detach()

        on_backward.__name__ = "activation-gradient hook"
        return on_backward

    def _training(self) -> bool:
        return self._model.training and torch.is_grad_enabled()

    def end_forward(self) -> None:
        compiling = torch.compiler.is_compiling()
        if compiling:
            if not self._training():
                return
        elif not self._recording:
            return
        self._recording = self._explicit = False
        self._done = True
        stashed, self._stash = self._stash, []
        names, tensors, dims, thresholds, roles = [], [], [], [], []
        rectified_of: list[int | None] = []
        position: dict[int, int] = {}  # by id() of a measured activation (all alive here)
        previous = None
        for spec, x, version, source in stashed:
            if version is not None and x._version != version:
                # An in-place op (ReLU(inplace=True), `out += identity`) overwrote this
                # output after its hook: measure it in the hook from now on, drop it now.
                self._reduce_in_hook.add(spec.name)
                self._warn_once(
                    f"inplace:{spec.name}",
                    f"torchvitals: the output of {spec.name!r} is modified in place later in "
                    "the forward; from the next step on it is measured in its own hook",
                )
                continue
            dim = feature_dim(spec, x.dim(), previous)
            if dim is not None and not spec.of_input:
                previous = (x.dim(), dim)
            if not compiling:  # compiled graphs measure each activation themselves
                j = position.get(id(source)) if source is not None else None
                derivable = (
                    j is not None
                    and j not in rectified_of
                    and rectified_of[j] is None
                    and dims[j] is None
                    and spec.saturation is None
                    and rectifiable(tensors[j], x)
                )
                rectified_of.append(j if derivable else None)
                position[id(x)] = len(tensors)
            names.append(spec.name)
            tensors.append(x)
            dims.append(dim if spec.has_units else None)
            thresholds.append(spec.saturation)
            roles.append(spec.role)
        reductions = self._reductions.compute(
            "act", names, tensors, dims, thresholds, roles, None if compiling else rectified_of
        )
        if compiling:
            # Assigned, not appended: appending reads the list, and Dynamo would guard on
            # its length. Under gradient accumulation the last micro-batch's are kept.
            self._compiled = reductions
        else:
            self._reductions.add(reductions)

    def take_compiled(self) -> list[Reduction]:
        """The activations a compiled forward reduced since the last call."""
        taken, self._compiled = self._compiled, []
        return taken

    @staticmethod
    def first_forward(reductions: list[Reduction]) -> list[Reduction]:
        """``reductions`` less the activations of a second forward in the same step
        (gradient accumulation): eager hooks record only the first; compiled ones every one."""
        seen: set[str] = set()
        kept = []
        for r in reductions:
            if r.kind == "act":
                if seen.intersection(r.names):
                    continue
                seen.update(r.names)
            kept.append(r)
        return kept

    def reduce_gradients(self) -> None:
        """Reduces the activation gradients stashed since the last call."""
        if self._grad_stash:
            stashed, self._grad_stash = self._grad_stash, {}
            self._reductions.reduce("act_grad", list(stashed), list(stashed.values()))

    def next_step(self, step: int) -> None:
        self.step = step
        self._done = self._recording = self._explicit = False
        self._stash.clear()
        self._grad_stash.clear()
