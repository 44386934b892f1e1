"""The Monitor: hooks on a model and optimizer that record every step's statistics.

Flow per step: forward hooks stash activations and the root module's forward hook
reduces them in one fused engine call; the optimizer's step pre-hook reduces all
gradients in one call; ``Monitor.step()`` adds weights and scalars, starts one
non-blocking device-to-host copy, and hands the writer a closure that the
background thread runs once the copy has landed. The training thread never waits
on the GPU, and a failure inside telemetry is counted and warned about, never raised
(unless ``strict=True``).
"""

from __future__ import annotations

import math
import os
import time
import warnings
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from torchvitals import histogram
from torchvitals.columns import COUNT_KEYS, MOMENT_KEYS
from torchvitals.ops import fused_stats
from torchvitals.selection import DEFAULT_TYPES, HookSpec, feature_dim, select_modules
from torchvitals.transfer import HostSnapshot
from torchvitals.writer import RunWriter

_ATTACHED = "_torchvitals_monitor"
_SUMSQ = MOMENT_KEYS.index("sumsq")
_NONFINITE = [COUNT_KEYS.index("nan"), COUNT_KEYS.index("inf")]
_DEAD = COUNT_KEYS.index("dead_units")


@dataclass
class MonitorConfig:
    """What is recorded and how often (every ``*_every`` is in optimizer steps)."""

    grad_every: int = 1
    act_every: int = 1
    weight_every: int = 100
    histograms: bool = True
    activations: bool = True
    act_grads: bool = False
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    types: tuple[str, ...] = field(default_factory=tuple)
    flush_interval: float = 1.0
    on_full: str = "drop"
    strict: bool = False


@dataclass
class _Batch:
    """One fused engine call's results for a group of same-kind tensors."""

    kind: str
    names: list[str]
    moments: torch.Tensor
    counts: torch.Tensor
    hist: torch.Tensor
    # Rows measured on a Sigmoid/Tanh input: "never positive" means nothing there.
    dead_undefined: list[bool] = field(default_factory=list)


def _first_tensor(value: Any) -> torch.Tensor | None:
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (tuple, list)) and value and isinstance(value[0], torch.Tensor):
        return value[0]
    return None


def _default_rank() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


class Monitor:
    """Every-step telemetry for ``model`` (and ``optimizer``), written to ``path``.

    ``every`` sets the cadence of gradients and activations; ``weight_every`` that of
    weight norms. ``on_full`` says what happens when the writer falls behind:
    ``"drop"`` (count and drop the step's record) or ``"block"``.
    """

    def __init__(
        self,
        model: nn.Module,
        path: str | os.PathLike[str],
        *,
        optimizer: torch.optim.Optimizer | None = None,
        scaler: torch.amp.GradScaler | None = None,
        every: int = 1,
        weight_every: int = 100,
        activations: bool = True,
        act_grads: bool = False,
        histograms: bool = True,
        types: Iterable[type[nn.Module]] = DEFAULT_TYPES,
        include: Iterable[str] = (),
        exclude: Iterable[str] = (),
        flush_interval: float = 1.0,
        on_full: Literal["block", "drop"] = "drop",
        strict: bool = False,
        rank: int | None = None,
        world_size: int | None = None,
    ) -> None:
        previous = getattr(model, _ATTACHED, None)
        if previous is not None and not previous.closed:
            raise RuntimeError(
                f"a torchvitals Monitor writing to {previous.path!s} is already attached to "
                "this model; call its close() before attaching another"
            )
        if every < 1 or weight_every < 1:
            raise ValueError(f"every={every} and weight_every={weight_every} must be >= 1")
        types = tuple(types)
        self.config = MonitorConfig(
            grad_every=every,
            act_every=every,
            weight_every=weight_every,
            histograms=histograms,
            activations=activations,
            act_grads=act_grads,
            include=tuple(include),
            exclude=tuple(exclude),
            types=tuple(t.__name__ for t in types),
            flush_interval=flush_interval,
            on_full=on_full,
            strict=strict,
        )
        self.path = path
        self.model = model
        self.optimizer = optimizer
        self.scaler = scaler
        default_rank, default_world = _default_rank()
        self.rank = default_rank if rank is None else rank
        self.world_size = default_world if world_size is None else world_size
        self.step_count = 0
        self.errors = 0
        self.closed = False
        self._warned: set[str] = set()
        self._pending: list[_Batch] = []
        self._graph_batches: list[_Batch] = []
        self._stashed_acts: list[tuple[HookSpec, torch.Tensor]] = []
        self._stashed_act_grads: list[tuple[str, torch.Tensor]] = []
        self._recording_acts = False
        self._acts_done = False
        self._grads_done = False
        self._last_step_time = time.perf_counter()
        self._handles: list[Any] = []

        self._param_names = {id(p): name for name, p in model.named_parameters()}
        hooked = select_modules(model, types, include, exclude) if activations else []
        self._register_hooks(hooked)
        self.writer = RunWriter(
            path,
            manifest=self._manifest(hooked),
            rank=self.rank,
            flush_interval=flush_interval,
            on_full=on_full,
            strict=strict,
        )
        setattr(model, _ATTACHED, self)

    # --- set-up ---------------------------------------------------------------------

    def _register_hooks(self, hooked: list[tuple[nn.Module, HookSpec]]) -> None:
        if hooked:
            self._handles.append(
                self.model.register_forward_pre_hook(self._guard(self._on_model_start))
            )
            self._handles.append(self.model.register_forward_hook(self._guard(self._on_model_end)))
        for module, spec in hooked:
            self._handles.append(
                module.register_forward_hook(self._guard(self._activation_hook(spec)))
            )
            if self.config.act_grads:
                hook = self._guard(self._act_grad_hook(spec.name))
                self._handles.append(module.register_full_backward_hook(hook))
        if self.optimizer is not None:
            hook = self._guard(self._on_optimizer_step)
            self._handles.append(self.optimizer.register_step_pre_hook(hook))

    def _manifest(self, hooked: list[tuple[nn.Module, HookSpec]]) -> dict[str, Any]:
        from torchvitals import __version__

        hooked_names = {spec.name: spec for _, spec in hooked}
        layers = []
        for name, module in self.model.named_modules():
            params = {n: list(p.shape) for n, p in module.named_parameters(recurse=False)}
            spec = hooked_names.get(name)
            if not params and spec is None:
                continue
            layers.append(
                {
                    "name": name,
                    "type": type(module).__name__,
                    "param_shapes": params,
                    "hooked": (["act"] if spec else []) + (["grad", "weight"] if params else []),
                    "measures": None if spec is None else ("input" if spec.of_input else "output"),
                    "saturation": None if spec is None else spec.saturation,
                }
            )
        first = next(self.model.parameters(), None)
        edges = histogram.hist_edges()
        return {
            "torchvitals_version": __version__,
            "torch_version": torch.__version__,
            "device": str(first.device) if first is not None else "cpu",
            "world_size": self.world_size,
            "config": asdict(self.config),
            "layers": layers,
            "hist_edges": {
                "labels": list(edges.labels),
                "min_exp": edges.min_exp,
                "max_exp": edges.max_exp,
            },
        }

    def _guard(self, fn: Callable) -> Callable:
        """Telemetry must never take the training run down: count, warn once, go on."""

        def guarded(*args: Any, **kwargs: Any) -> Any:
            try:
                return fn(*args, **kwargs)
            except Exception as exc:
                self.errors += 1
                if self.config.strict:
                    raise
                key = getattr(fn, "__name__", "hook")
                if key not in self._warned:
                    self._warned.add(key)
                    warnings.warn(
                        f"torchvitals: {key} failed and was skipped ({type(exc).__name__}: {exc}); "
                        "training continues",
                        RuntimeWarning,
                        stacklevel=2,
                    )
                return None

        return guarded

    # --- hooks ----------------------------------------------------------------------

    def _on_model_start(self, module: nn.Module, args: Any) -> None:
        self._recording_acts = (
            module.training
            and not self._acts_done
            and self.step_count % self.config.act_every == 0
            and torch.is_grad_enabled()
        )

    def _activation_hook(self, spec: HookSpec) -> Callable:
        def on_forward(module: nn.Module, args: Any, output: Any) -> None:
            if not self._recording_acts:
                return
            x = _first_tensor(args if spec.of_input else output)
            if x is not None and x.is_floating_point() and x.layout == torch.strided:
                self._stashed_acts.append((spec, x.detach()))

        on_forward.__name__ = "activation hook"
        return on_forward

    def _act_grad_hook(self, name: str) -> Callable:
        def on_backward(module: nn.Module, grad_input: Any, grad_output: Any) -> None:
            g = _first_tensor(grad_output)
            if g is not None and self.step_count % self.config.grad_every == 0:
                self._stashed_act_grads.append((name, g.detach()))

        on_backward.__name__ = "activation-gradient hook"
        return on_backward

    def _on_model_end(self, module: nn.Module, args: Any, output: Any) -> None:
        if not self._recording_acts:
            return
        self._recording_acts = False
        self._acts_done = True
        stashed, self._stashed_acts = self._stashed_acts, []
        names, tensors, dims, thresholds, of_input = [], [], [], [], []
        previous = None
        for spec, x in stashed:
            dim = feature_dim(spec, x.dim(), previous)
            if dim is not None and not spec.of_input:
                previous = (x.dim(), dim)
            names.append(spec.name)
            tensors.append(x)
            dims.append(dim)
            thresholds.append(spec.saturation)
            of_input.append(spec.of_input)
        self._reduce("act", names, tensors, dims, thresholds, of_input)

    def _on_optimizer_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        self._collect_grads()

    # --- collection -----------------------------------------------------------------

    def _reduce(
        self,
        kind: str,
        names: list[str],
        tensors: list[torch.Tensor],
        dims: list[int | None] | None = None,
        thresholds: list[float | None] | None = None,
        dead_undefined: list[bool] | None = None,
    ) -> None:
        """One fused engine call per device (parameters may live on several)."""
        dims = dims or [None] * len(tensors)
        thresholds = thresholds or [None] * len(tensors)
        dead_undefined = dead_undefined or [False] * len(tensors)
        by_device: dict[torch.device, list[int]] = {}
        for i, t in enumerate(tensors):
            by_device.setdefault(t.device, []).append(i)
        for idx in by_device.values():
            moments, counts, hist = fused_stats(
                [tensors[i] for i in idx],
                feature_dim=[dims[i] for i in idx],
                saturation=[thresholds[i] for i in idx],
            )
            batch = _Batch(
                kind,
                [names[i] for i in idx],
                moments,
                counts,
                hist,
                [dead_undefined[i] for i in idx],
            )
            self._pending.append(batch)
            if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
                # Hooks run once, at capture; every replay rewrites these outputs.
                self._graph_batches.append(batch)

    def _named_params(self) -> list[tuple[str, torch.Tensor]]:
        if self.optimizer is None:
            return list(self.model.named_parameters())
        seen, out = set(), []
        for group in self.optimizer.param_groups:
            for p in group["params"]:
                if id(p) not in seen:  # tied parameters are counted once
                    seen.add(id(p))
                    out.append((self._param_names.get(id(p), f"param{len(out)}"), p))
        return out

    def _collect_grads(self) -> None:
        if self._grads_done or self.step_count % self.config.grad_every:
            return
        self._grads_done = True
        names, grads = [], []
        for name, p in self._named_params():
            g = p.grad
            if g is None:  # frozen, or not reached by this backward
                continue
            if g.is_sparse:
                g = g.coalesce().values()  # statistics of the stored values
            names.append(name)
            grads.append(g)
        if grads:
            self._reduce("grad", names, grads)
        if self._stashed_act_grads:
            stashed, self._stashed_act_grads = self._stashed_act_grads, []
            self._reduce("act_grad", [n for n, _ in stashed], [g for _, g in stashed])

    def _collect_weights(self) -> None:
        named = [(n, p) for n, p in self._named_params() if p.layout == torch.strided]
        if named:
            self._reduce("weight", [n for n, _ in named], [p.detach() for _, p in named])

    def _device_scalars(self, loss: Any, scalars: dict[str, Any]) -> tuple[dict, dict]:
        """Split scalars into host floats and device tensors (read later, off-thread)."""
        host: dict[str, float] = {}
        device: dict[str, torch.Tensor] = {}
        items = {"loss": loss, **scalars} if loss is not None else dict(scalars)
        if self.optimizer is not None:
            for i, group in enumerate(self.optimizer.param_groups):
                items[f"lr/group{i}"] = group.get("lr")
        if self.scaler is not None and self.scaler.is_enabled():
            scale = getattr(self.scaler, "_scale", None)
            items["loss_scale"] = scale if scale is not None else self.scaler.get_scale()
        for name, value in items.items():
            if isinstance(value, torch.Tensor):
                if value.numel() != 1:
                    raise ValueError(f"scalar {name!r} has {value.numel()} elements, expected 1")
                if value.device.type == "cpu":
                    host[name] = float(value.detach())
                else:
                    device[name] = value.detach().reshape(()).to(torch.float64)
            elif value is not None:
                host[name] = float(value)
        return host, device

    # --- the step -------------------------------------------------------------------

    def step(self, loss: Any = None, **scalars: Any) -> None:
        """Ends the current step: records its statistics and scalars (tensors welcome:
        they are read on the writer thread, never with a sync here)."""
        if self.closed:
            if "closed" not in self._warned:
                self._warned.add("closed")
                warnings.warn(
                    "torchvitals: Monitor.step() after close() records nothing", stacklevel=2
                )
            return
        self._guard(self._step)(loss, scalars)
        self.step_count += 1
        self._acts_done = self._grads_done = False
        self._stashed_acts.clear()
        self._stashed_act_grads.clear()

    def _step(self, loss: Any, scalars: dict[str, Any]) -> None:
        now = time.perf_counter()
        step_time, self._last_step_time = now - self._last_step_time, now
        if self.optimizer is None:
            self._collect_grads()
        if self.step_count % self.config.weight_every == 0:
            self._collect_weights()
        host, device = self._device_scalars(loss, scalars)
        host["step_time"] = step_time
        batches, self._pending = self._pending or list(self._graph_batches), []

        tensors: dict[str, torch.Tensor] = {}
        for i, b in enumerate(batches):
            tensors[f"{i}.moments"], tensors[f"{i}.counts"] = b.moments, b.counts
            if self.config.histograms:
                tensors[f"{i}.hist"] = b.hist
        if device:
            tensors["scalars"] = torch.stack(list(device.values()))
        snapshot = HostSnapshot(tensors)
        step = self.step_count
        meta = [(b.kind, b.names) for b in batches]
        dead_undefined = np.array([u for b in batches for u in b.dead_undefined], dtype=bool)
        device_names = list(device)
        cache: dict[str, dict] = {}

        def arrays() -> dict[str, np.ndarray]:
            if "arrays" not in cache:
                cache["arrays"] = snapshot.wait()
            return cache["arrays"]

        def scalar_columns() -> dict[str, Any]:
            a = arrays()
            values = dict(host)
            if device_names:
                values.update(zip(device_names, a["scalars"].tolist(), strict=True))
            grads = [i for i, (kind, _) in enumerate(meta) if kind == "grad"]
            if grads:
                sumsq = sum(float(a[f"{i}.moments"][:, _SUMSQ].sum()) for i in grads)
                nonfinite = sum(int(a[f"{i}.counts"][:, _NONFINITE].sum()) for i in grads)
                values["grad_norm"] = math.sqrt(sumsq)
                values["grad_nonfinite"] = float(nonfinite)
            return {"step": step, "name": list(values), "value": list(values.values())}

        def layer_columns() -> dict[str, Any]:
            a = arrays()
            moments = np.concatenate([a[f"{i}.moments"] for i in range(len(meta))])
            counts = np.concatenate([a[f"{i}.counts"] for i in range(len(meta))])
            counts[dead_undefined, _DEAD] = 0
            cols: dict[str, Any] = {
                "step": step,
                "layer": [n for _, names in meta for n in names],
                "kind": [kind for kind, names in meta for _ in names],
            }
            cols.update({k: counts[:, j] for j, k in enumerate(COUNT_KEYS)})
            cols.update({k: moments[:, j] for j, k in enumerate(MOMENT_KEYS)})
            return cols

        def hist_columns() -> dict[str, Any]:
            a = arrays()
            return {
                "step": step,
                "layer": [n for _, names in meta for n in names],
                "kind": [kind for kind, names in meta for _ in names],
                "counts": np.concatenate([a[f"{i}.hist"] for i in range(len(meta))]),
            }

        self.writer.submit("scalars", scalar_columns)
        if meta:
            self.writer.submit("layers", layer_columns)
            if self.config.histograms:
                self.writer.submit("hist", hist_columns)

    # --- lifetime -------------------------------------------------------------------

    def close(self) -> None:
        """Removes every hook and flushes the run to disk; idempotent."""
        if self.closed:
            return
        self.closed = True
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._pending.clear()
        if getattr(self.model, _ATTACHED, None) is self:
            delattr(self.model, _ATTACHED)
        self.writer.close()

    def __enter__(self) -> Monitor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
