"""The copy preflight works on, and how one training step runs on it.

Nothing of the user's is touched: the model is deep-copied (without the hooks of a
torchvitals Monitor attached to it, which would otherwise record preflight's steps into the
user's run), the optimizer is rebuilt on the copy from its class, defaults and param
groups (with fresh state), and the RNGs preflight draws from are restored on the way out.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import math
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from torchvitals.collect.distributed import unwrap
from torchvitals.collect.monitor import Monitor

StepFn = Callable[[nn.Module, Any], torch.Tensor]
LossFn = Callable[[Any, Any], torch.Tensor]

DEFAULT_LR = 1e-3  # Adam's, used when no optimizer is given


def layer_of(param_name: str) -> str:
    """The module that owns a parameter (``"fc1.weight"`` -> ``"fc1"``)."""
    module, _, _ = param_name.rpartition(".")
    return module or param_name


def check_loss(loss: object, source: str) -> torch.Tensor:
    """``loss`` as a 0-d tensor, or an error that says what is wrong with it."""
    if not isinstance(loss, torch.Tensor):
        raise TypeError(f"{source} returned a {type(loss).__name__}, not a torch.Tensor")
    if loss.numel() != 1:
        raise ValueError(
            f"{source} returned a tensor of shape {tuple(loss.shape)}, not a scalar loss; "
            "reduce it (e.g. reduction='mean')"
        )
    if not loss.is_floating_point():
        raise TypeError(f"{source} returned a {loss.dtype} tensor; a loss is floating point")
    if torch.is_grad_enabled() and not loss.requires_grad:
        raise ValueError(
            f"{source} returned a loss that does not require grad: no trainable parameter "
            "of the model reaches it"
        )
    return loss.reshape(())


@dataclass(frozen=True)
class Step:
    """The loss of one training step: ``loss_fn(model(inputs), targets)`` for a batch
    ``(inputs, targets)``, or ``step_fn(model, batch)``."""

    loss_fn: LossFn | None
    step_fn: StepFn | None

    def __call__(self, model: nn.Module, batch: Any) -> tuple[torch.Tensor, Any]:
        """``(loss, model output)``; the output is ``None`` with a ``step_fn``."""
        if self.step_fn is not None:
            return check_loss(self.step_fn(model, batch), "step_fn"), None
        inputs, targets = batch
        output = model(inputs)
        return check_loss(self.loss_fn(output, targets), "loss_fn"), output


@dataclass(frozen=True)
class OptimizerRecipe:
    """How to build the user's optimizer on a copy of the model: its class, its defaults,
    and the parameters (by name) and options of each param group."""

    cls: type[torch.optim.Optimizer]
    defaults: dict[str, Any]
    groups: list[tuple[list[str], dict[str, Any]]]
    lr: float | None  #: the reference learning rate: param group 0's

    @classmethod
    def default(cls, model: nn.Module) -> OptimizerRecipe:
        names = [n for n, p in model.named_parameters() if p.requires_grad]
        return cls(torch.optim.Adam, {"lr": DEFAULT_LR}, [(names, {"lr": DEFAULT_LR})], DEFAULT_LR)

    @classmethod
    def of(cls, optimizer: torch.optim.Optimizer, model: nn.Module) -> OptimizerRecipe:
        """The recipe of ``optimizer``, whose parameters belong to ``model`` (others, such
        as those of a loss module, are left out). A group's ``initial_lr`` (set by an LR
        scheduler) stands for its LR, so a warm-up starting at 0 still probes the real one."""
        names = {id(p): n for n, p in model.named_parameters()}
        groups = []
        for group in optimizer.param_groups:
            options = {k: v for k, v in group.items() if k != "params"}
            if "initial_lr" in options:
                options["lr"] = options["initial_lr"]
            groups.append(([names[id(p)] for p in group["params"] if id(p) in names], options))
        lr = groups[0][1].get("lr") if groups else None
        return cls(type(optimizer), dict(optimizer.defaults), groups, _as_float(lr))

    def describe(self, lr: float | None = None) -> str:
        lr = self.lr if lr is None else lr
        return f"{self.cls.__name__}(lr={lr:.3g})" if lr is not None else self.cls.__name__

    def group_of(self, name: str) -> tuple[int, dict[str, Any]] | None:
        """``(index, options)`` of the param group holding parameter ``name``."""
        for i, (names, options) in enumerate(self.groups):
            if name in names:
                return i, options
        return None

    def build(self, model: nn.Module, lr: float | None = None) -> torch.optim.Optimizer:
        """The optimizer on ``model``'s parameters; ``lr`` rescales every group's LR so that
        group 0 gets ``lr`` (the ratios between groups are kept)."""
        params = dict(model.named_parameters())
        scale = lr / self.lr if lr is not None and self.lr else None
        groups = []
        for names, options in self.groups:
            chosen = [params[n] for n in names if n in params]
            if not chosen:
                continue
            options = dict(options)
            if scale is not None:
                options["lr"] = options["lr"] * scale
            groups.append({**options, "params": chosen})
        # Every group carries all its options; the defaults only need to satisfy the
        # constructor, which may not take all of them back (AdamW sets one itself).
        accepted = inspect.signature(self.cls).parameters
        takes_any = any(p.kind is p.VAR_KEYWORD for p in accepted.values())
        defaults = {k: v for k, v in self.defaults.items() if takes_any or k in accepted}
        try:
            return self.cls(groups, **defaults)
        except (TypeError, ValueError) as exc:
            raise TypeError(
                f"preflight rebuilds the optimizer on its copy of the model as "
                f"{self.cls.__name__}(param_groups, **optimizer.defaults), which failed: {exc}"
            ) from exc


def _as_float(value: Any) -> float | None:
    return None if value is None else float(value)


def _monitors_of(model: nn.Module, given: Monitor | None) -> list[Monitor]:
    found = [v for m in model.modules() for v in vars(m).values() if isinstance(v, Monitor)]
    if given is not None and all(given is not m for m in found):
        found.append(given)
    return found


def copy_model(model: nn.Module, monitor: Monitor | None = None) -> nn.Module:
    """A deep copy of ``model`` (unwrapped from DDP / ``torch.compile``), in train mode,
    without the hooks of any torchvitals Monitor attached to it or given."""
    model, _ = unwrap(model)
    monitors = _monitors_of(model, monitor)
    memo: dict[int, Any] = {id(m): m for m in monitors}  # a Monitor holds threads: not copied
    try:
        work = copy.deepcopy(model, memo)
    except Exception as exc:
        raise TypeError(
            f"model could not be deep-copied ({type(exc).__name__}: {exc}); preflight works "
            "on a copy so that the model is left untouched"
        ) from exc
    # Hook ids are unique process-wide and survive the copy: drop the Monitors' ones.
    hook_ids = frozenset().union(*(m.hook_ids for m in monitors))
    for module in work.modules():
        for key, value in list(vars(module).items()):
            if isinstance(value, Monitor):
                del module.__dict__[key]
            elif "hooks" in key and isinstance(value, dict):
                for hook_id in hook_ids & set(value):
                    del value[hook_id]
    return work.train()


def cuda_devices(model: nn.Module) -> list[int]:
    return sorted({p.get_device() for p in model.parameters() if p.is_cuda})


def seed_rng(seed: int, devices: list[int]) -> None:
    """Seeds the CPU generator and those of ``devices``. (``torch.manual_seed`` would also
    queue a seed for every CUDA device not yet initialised, which outlives preflight.)"""
    torch.default_generator.manual_seed(seed)
    for d in devices:
        torch.cuda.default_generators[d].manual_seed(seed)


@contextlib.contextmanager
def preserved_rng(model: nn.Module) -> Iterator[None]:
    """Restores torch's CPU generator and those of the model's CUDA devices, Python's and
    NumPy's on exit."""
    devices = cuda_devices(model)
    py_state, np_state = random.getstate(), np.random.get_state()
    try:
        with torch.random.fork_rng(devices=devices, device_type="cuda"):
            yield
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)


def map_tensors(obj: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """``obj`` with ``fn`` applied to every tensor in it (tuples, lists and dicts walked)."""
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, (tuple, list)):
        return type(obj)(map_tensors(v, fn) for v in obj)
    if isinstance(obj, dict):
        return {k: map_tensors(v, fn) for k, v in obj.items()}
    return obj


def first_tensor_in(obj: Any) -> torch.Tensor | None:
    found: list[torch.Tensor] = []
    map_tensors(obj, lambda t: found.append(t) or t)
    return found[0] if found else None


def slice_batch(batch: Any, n: int) -> Any:
    """The first ``n`` samples: every tensor whose first dim is the batch size (that of the
    first tensor in the batch) is sliced; anything else is kept."""
    first = first_tensor_in(batch)
    if first is None or first.dim() == 0:
        return batch
    size = first.shape[0]
    return map_tensors(batch, lambda t: t[:n] if t.dim() and t.shape[0] == size else t)


def cast_floats(obj: Any, dtype: torch.dtype) -> Any:
    """``obj`` with every floating-point tensor cast to ``dtype``."""
    return map_tensors(obj, lambda t: t.to(dtype) if t.is_floating_point() else t)


class Workbench:
    """The working copy of the model, its initial state, the batch and the step."""

    def __init__(
        self,
        model: nn.Module,
        batch: Any,
        step: Step,
        optimizer: OptimizerRecipe,
        seed: int,
    ) -> None:
        self.model = model
        self.batch = batch
        self.step = step
        self.optimizer = optimizer
        self.seed = seed
        self.devices = cuda_devices(model)
        self.init_state = {k: v.clone() for k, v in model.state_dict().items()}

    def seed_rng(self) -> None:
        seed_rng(self.seed, self.devices)

    def reset(self) -> None:
        """Back to the initial weights and buffers, and the same random draws."""
        self.model.load_state_dict(self.init_state)
        self.seed_rng()

    def loss(self) -> float:
        """The loss on the batch now, without a backward."""
        with torch.no_grad():
            return float(self.step(self.model, self.batch)[0])

    def train(
        self,
        optimizer: torch.optim.Optimizer,
        steps: int,
        *,
        after_backward: Callable[[], None] | None = None,
        after_step: Callable[[int], None] | None = None,
        until: Callable[[list[float]], bool] | None = None,
    ) -> list[float]:
        """Up to ``steps`` optimizer steps on the batch; returns each step's loss (taken
        before its update). Stops after a non-finite loss, or once ``until(losses)``."""
        losses: list[float] = []
        taken: list[torch.Tensor] = []

        def closure() -> torch.Tensor:
            optimizer.zero_grad(set_to_none=True)
            loss, _ = self.step(self.model, self.batch)
            loss.backward()
            if after_backward is not None:
                after_backward()
            taken.append(loss.detach())
            return loss

        for i in range(steps):
            taken.clear()
            optimizer.step(closure)  # the closure form also serves LBFGS
            losses.append(float(taken[0]))
            if after_step is not None:
                after_step(i)
            if not math.isfinite(losses[-1]) or (until is not None and until(losses)):
                break
        return losses
