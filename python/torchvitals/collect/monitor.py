"""The Monitor: hooks on a model and optimizer that record every step's statistics.

Flow per step: forward hooks stash activations and the root module's forward hook
reduces them in one fused engine call; each optimizer's step pre-hook reduces the
gradients of its parameters in one call; ``Monitor.step()`` adds weights and scalars,
starts one non-blocking device-to-host copy, and hands the writer a closure that the
background thread runs once the copy has landed. The training thread never waits
on the GPU, and a failure inside telemetry is counted and warned about, never raised
(unless ``strict=True``).

Distributed (``torchvitals.collect.distributed``): each rank records what it holds, with no
communication; a DTensor parameter (FSDP2) through its local shard, replicas (DDP)
once. The optional live mode adds one asynchronous ``all_reduce`` per step.
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

from torchvitals.collect.distributed import (
    LIVE_SCALARS,
    GradsOn,
    LiveReducer,
    ParamPolicy,
    initialized,
    layout,
    unwrap,
)
from torchvitals.collect.host_copy import HostSnapshot
from torchvitals.collect.selection import DEFAULT_TYPES, HookSpec, feature_dim, select_modules
from torchvitals.engine import histogram
from torchvitals.engine.contract import COUNT_KEYS, MOMENT_KEYS
from torchvitals.engine.op import fused_stats
from torchvitals.store.schema import HOOK_TIME_SCALAR
from torchvitals.store.writer import RunWriter

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
    grads_on: str = "auto"
    live: bool = False


@dataclass
class _Batch:
    """One fused engine call's results for a group of same-kind tensors."""

    kind: str
    names: list[str]
    moments: torch.Tensor
    counts: torch.Tensor
    hist: torch.Tensor
    # Rows whose "never positive" count is no dead-unit count (see HookSpec.counts_dead).
    dead_undefined: list[bool] = field(default_factory=list)


def _first_tensor(value: Any) -> torch.Tensor | None:
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (tuple, list)) and value and isinstance(value[0], torch.Tensor):
        return value[0]
    return None


def _snapshot(value: Any) -> Any:
    return value.detach().clone() if isinstance(value, torch.Tensor) else value


def _default_rank() -> tuple[int, int]:
    if initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


class Monitor:
    """Every-step telemetry for ``model`` (and ``optimizer``), written to ``path``.

    ``every`` sets the cadence of gradients and, unless ``act_every`` is given, of
    activations (the costly part on a CPU: one extra pass over them); ``weight_every``
    that of weight norms. ``on_full`` says what happens when the writer falls behind:
    ``"drop"`` (count and drop the step's record) or ``"block"``.

    ``optimizer`` may be a list (each optimizer's gradients are read at its own step).
    ``grads_on`` says which ranks record parameters (gradients and weights): ``"rank0"``
    records plain parameters on rank 0 only (they are replicas, as under DDP), ``"all"``
    on every rank; ``"auto"`` is ``"rank0"`` for a ``DistributedDataParallel`` model or a
    model with DTensor (sharded) parameters, else ``"all"``. DTensor shards are always
    recorded once each. ``live=True`` adds one asynchronous ``all_reduce`` per step over
    ``live_group`` and writes the global ``LIVE_SCALARS`` one step later.
    """

    def __init__(
        self,
        model: nn.Module,
        path: str | os.PathLike[str],
        *,
        optimizer: torch.optim.Optimizer | Iterable[torch.optim.Optimizer] | None = None,
        scaler: torch.amp.GradScaler | None = None,
        every: int = 1,
        act_every: int | None = None,
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
        grads_on: GradsOn = "auto",
        live: bool = False,
        live_group: Any = None,
    ) -> None:
        model, ddp = unwrap(model)
        previous = getattr(model, _ATTACHED, None)
        if previous is not None and not previous.closed:
            raise RuntimeError(
                f"a torchvitals Monitor writing to {previous.path!s} is already attached to "
                "this model; call its close() before attaching another"
            )
        act_every = every if act_every is None else act_every
        if min(every, act_every, weight_every) < 1:
            raise ValueError(
                f"every={every}, act_every={act_every} and weight_every={weight_every} must be >= 1"
            )
        types = tuple(types)
        self.config = MonitorConfig(
            grad_every=every,
            act_every=act_every,
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
            live=live,
        )
        self.path = path
        self.model = model
        if optimizer is None:
            optimizer = []
        elif isinstance(optimizer, torch.optim.Optimizer):
            optimizer = [optimizer]
        self.optimizers: list[torch.optim.Optimizer] = list(optimizer)
        self.scaler = scaler
        default_rank, default_world = _default_rank()
        self.rank = default_rank if rank is None else rank
        self.world_size = default_world if world_size is None else world_size
        self._policy = ParamPolicy(model, self.rank, grads_on, ddp is not None)
        self.config.grads_on = self._policy.grads_on
        if live and not initialized():
            raise ValueError("live=True needs an initialized torch.distributed process group")
        self._live = LiveReducer(live_group) if live else None
        self.step_count = 0
        self.errors = 0
        self.closed = False
        self._warned: set[str] = set()
        self._pending: list[_Batch] = []
        self._graph_batches: list[_Batch] = []
        self._stashed_acts: list[tuple[HookSpec, torch.Tensor, int | None]] = []
        self._reduce_in_hook: set[str] = set()  # modules whose output is changed in place
        self._stashed_act_grads: dict[str, torch.Tensor] = {}  # by module, in backward order
        self._recording_acts = False
        self._acts_done = False
        self._grads_seen: set[int] = set()  # parameters whose gradient this step has read
        self._step_grads: list[_Batch] = []
        self._step_lrs: dict[int, list[Any]] = {}  # lr of each optimizer at its step
        self._previous_scale = _snapshot(getattr(scaler, "_scale", None))
        self._last_step_time = time.perf_counter()
        # Training-thread time in hooks and step() since the last record: what telemetry
        # costs the training loop, measured where it is spent (guarded calls never nest).
        self._hook_seconds = 0.0
        self._handles: list[Any] = []

        self._param_names = {id(p): name for name, p in model.named_parameters()}
        hooked = select_modules(model, types, include, exclude) if activations else []
        # The writer first: if it raises (strict mode), no hook is left behind on the model.
        self.writer = RunWriter(
            path,
            manifest=self._manifest(hooked, ddp),
            rank=self.rank,
            flush_interval=flush_interval,
            on_full=on_full,
            strict=strict,
        )
        self._register_hooks(hooked)
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
        for optimizer in self.optimizers:
            hook = self._guard(self._optimizer_hook())
            self._handles.append(optimizer.register_step_pre_hook(hook))

    def _manifest(
        self, hooked: list[tuple[nn.Module, HookSpec]], ddp: nn.Module | None
    ) -> dict[str, Any]:
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
            "distributed": layout(
                self.model.named_parameters(),
                self._policy,
                rank=self.rank,
                world_size=self.world_size,
                ddp=ddp,
                live=self._live is not None,
            ),
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
            # Dynamo cannot trace perf_counter: under torch.compile a hook's clock would
            # break the graph at every hooked module. Compiled hooks go untimed.
            timed = not torch.compiler.is_compiling()
            start = time.perf_counter() if timed else 0.0
            try:
                return fn(*args, **kwargs)
            except Exception as exc:
                self.errors += 1
                if self.config.strict:
                    raise
                key = getattr(fn, "__name__", "hook")
                self._warn_once(
                    key,
                    f"torchvitals: {key} failed and was skipped ({type(exc).__name__}: {exc}); "
                    "training continues",
                    RuntimeWarning,
                )
                return None
            finally:
                if timed:
                    self._hook_seconds += time.perf_counter() - start

        return guarded

    def _warn_once(self, key: str, message: str, category: type[Warning] = UserWarning) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(message, category, stacklevel=3)

    # --- hooks ----------------------------------------------------------------------

    def _on_model_start(self, module: nn.Module, args: Any) -> None:
        self._begin_forward()

    def _begin_forward(self) -> None:
        if not self._recording_acts:  # else nested in an explicit begin_forward()
            self._stashed_acts.clear()
        self._recording_acts = (
            self.model.training
            and not self._acts_done
            and self.step_count % self.config.act_every == 0
            and torch.is_grad_enabled()
        )

    def _activation_hook(self, spec: HookSpec) -> Callable:
        def on_forward(module: nn.Module, args: Any, output: Any) -> None:
            if not self._recording_acts:
                return
            x = _first_tensor(args if spec.of_input else output)
            if x is None or not x.is_floating_point() or x.layout != torch.strided:
                return
            if spec.name in self._reduce_in_hook:  # its output is overwritten later
                dim = feature_dim(spec, x.dim(), None)
                self._reduce("act", [spec.name], [x], [dim], [spec.saturation],
                             [not spec.counts_dead])  # fmt: skip
            else:
                # An in-place op later bumps the version. (Compiled graphs functionalize
                # in-place ops; their versions mean nothing.)
                version = None if torch.compiler.is_compiling() else x._version
                self._stashed_acts.append((spec, x, version))

        on_forward.__name__ = "activation hook"
        return on_forward

    def _act_grad_hook(self, name: str) -> Callable:
        def on_backward(module: nn.Module, grad_input: Any, grad_output: Any) -> None:
            g = _first_tensor(grad_output)
            # Under gradient accumulation only the step's first backward is kept.
            seen = name in self._stashed_act_grads
            if g is not None and not seen and self.step_count % self.config.grad_every == 0:
                self._stashed_act_grads[name] = g.detach()

        on_backward.__name__ = "activation-gradient hook"
        return on_backward

    def _on_model_end(self, module: nn.Module, args: Any, output: Any) -> None:
        self._end_forward()

    def _end_forward(self) -> None:
        if not self._recording_acts:
            return
        self._recording_acts = False
        self._acts_done = True
        stashed, self._stashed_acts = self._stashed_acts, []
        names, tensors, dims, thresholds, dead_undefined = [], [], [], [], []
        previous = None
        for spec, x, version in stashed:
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
            names.append(spec.name)
            tensors.append(x)
            dims.append(dim)
            thresholds.append(spec.saturation)
            dead_undefined.append(not spec.counts_dead)
        self._reduce("act", names, tensors, dims, thresholds, dead_undefined)

    def _optimizer_hook(self) -> Callable:
        def on_optimizer_step(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> Any:
            self._step_lrs[id(optimizer)] = [_snapshot(g.get("lr")) for g in optimizer.param_groups]
            # args[0] is the optimizer itself, args[1] a positional closure
            closure = kwargs.get("closure", args[1] if len(args) > 1 else None)
            if closure is None:
                self._collect_grads(optimizer)
                return None

            # A closure (LBFGS, Lightning) runs the backward inside step(): read the
            # gradients when it returns.
            def closure_then_collect() -> Any:
                loss = closure()
                self._guard(self._collect_grads)(optimizer)
                return loss

            if "closure" in kwargs:
                return args, {**kwargs, "closure": closure_then_collect}
            return (args[0], closure_then_collect, *args[2:]), kwargs

        on_optimizer_step.__name__ = "optimizer step hook"
        return on_optimizer_step

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
        by_device: dict[int, list[int]] = {}  # by get_device(): -1 is the CPU
        for i, t in enumerate(tensors):
            by_device.setdefault(t.get_device(), []).append(i)
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

    def _named_params(
        self, optimizer: torch.optim.Optimizer | None = None
    ) -> list[tuple[str, torch.Tensor]]:
        """Parameters of ``optimizer`` (default: of every optimizer, else of the model)."""
        optimizers = self.optimizers if optimizer is None else [optimizer]
        if not optimizers:
            return list(self.model.named_parameters())
        seen, out = set(), []
        for opt in optimizers:
            for group in opt.param_groups:
                for p in group["params"]:
                    if id(p) not in seen:  # tied parameters are counted once
                        seen.add(id(p))
                        out.append((self._param_names.get(id(p), f"param{len(out)}"), p))
        return out

    def _collect_grads(self, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Gradients of ``optimizer``'s parameters not yet read this step."""
        if self.step_count % self.config.grad_every:
            return
        names, grads = [], []
        for name, p in self._named_params(optimizer):
            if id(p) in self._grads_seen:  # once per step, also across optimizers
                continue
            self._grads_seen.add(id(p))
            g = p.grad
            if g is None:  # frozen, or not reached by this backward
                continue
            g = self._policy.local(p, g)
            if g is None:  # another rank records this parameter
                continue
            if g.is_sparse:
                g = g.coalesce().values()  # statistics of the stored values
            names.append(name)
            grads.append(g)
        if grads:
            self._reduce("grad", names, grads)
        if self._stashed_act_grads:
            stashed, self._stashed_act_grads = self._stashed_act_grads, {}
            self._reduce("act_grad", list(stashed), list(stashed.values()))

    def _collect_weights(self) -> None:
        named = []
        for name, p in self._named_params():
            w = self._policy.local(p, p.detach())
            if w is not None and w.layout == torch.strided:
                named.append((name, w))
        if named:
            self._reduce("weight", [n for n, _ in named], [w for _, w in named])

    def _device_scalars(self, loss: Any, scalars: dict[str, Any]) -> tuple[dict, dict]:
        """Split scalars into host floats and device tensors (read later, off-thread)."""
        host: dict[str, float] = {}
        device: dict[str, torch.Tensor] = {}
        items = {"loss": loss, **scalars} if loss is not None else dict(scalars)
        for k, opt in enumerate(self.optimizers):
            prefix = "lr/" if len(self.optimizers) == 1 else f"lr/opt{k}/"
            lrs = self._step_lrs.get(id(opt)) or [g.get("lr") for g in opt.param_groups]
            for i, lr in enumerate(lrs):
                items[f"{prefix}group{i}"] = lr
        if self.scaler is not None and self.scaler.is_enabled():
            scale = getattr(self.scaler, "_scale", None)
            if scale is None:
                items["loss_scale"] = self.scaler.get_scale()
            else:
                items["loss_scale"] = scale
                # update() lowers the scale exactly when it skipped the step (its
                # backoff factor is < 1): a comparison on the device, no sync.
                previous = self._previous_scale
                items["skipped_step"] = scale < (
                    previous if previous is not None else self.scaler._init_scale
                )
                self._previous_scale = scale.clone()  # update() changes it in place
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
            self._warn_once("closed", "torchvitals: Monitor.step() after close() records nothing")
            return
        # Read before the guard starts its clock: the step boundary lies outside every timed
        # span, so hook_time covers exactly the span of step_time.
        self._guard(self._step)(time.perf_counter(), loss, scalars)
        if self._live is not None:  # apart from _step: every rank must reduce every step
            self._guard(self._live_step)(loss)
        self.step_count += 1
        self._acts_done = self._recording_acts = False
        self._grads_seen.clear()
        self._step_grads.clear()
        self._step_lrs.clear()
        self._stashed_acts.clear()
        self._stashed_act_grads.clear()

    def begin_forward(self) -> None:
        """Starts recording this step's activations. The model's forward does it by itself;
        call it (and :meth:`end_forward`) when the training step runs submodules without
        the monitored module's own forward, as a LightningModule's ``training_step`` may."""
        self._guard(self._begin_forward)()

    def end_forward(self) -> None:
        """Reduces the activations recorded since :meth:`begin_forward` (a no-op when the
        model's forward already did)."""
        self._guard(self._end_forward)()

    def _step(self, now: float, loss: Any, scalars: dict[str, Any]) -> None:
        step_time, self._last_step_time = now - self._last_step_time, now
        if not self.optimizers:
            self._collect_grads()
        if self.step_count % self.config.weight_every == 0:
            self._collect_weights()
        host, device = self._device_scalars(loss, scalars)
        host["step_time"] = step_time
        # Time in hooks over the same span as step_time; this call counts in the next one.
        host[HOOK_TIME_SCALAR], self._hook_seconds = self._hook_seconds, 0.0
        # Batches captured in a CUDA graph are rewritten by every replay; hooks do not run.
        pending = {id(b) for b in self._pending}
        captured = [b for b in self._graph_batches if id(b) not in pending]
        batches, self._pending = self._pending + captured, []
        self._step_grads = [b for b in batches if b.kind == "grad"]

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

    # --- live mode ------------------------------------------------------------------

    def _live_step(self, loss: Any) -> None:
        """Writes the previous step's global view and starts this step's all_reduce."""
        self._write_live()
        first = next(self.model.parameters(), None)
        device = first.device if first is not None else torch.device("cpu")
        zero = torch.zeros((), dtype=torch.float64, device=device)
        if isinstance(loss, torch.Tensor):
            loss_value = loss.detach().reshape(()).to(device, torch.float64)
        else:
            loss_value = zero if loss is None else torch.full_like(zero, float(loss))
        sumsq, nonfinite = zero, zero
        for b in self._step_grads:
            sumsq = sumsq + b.moments[:, _SUMSQ].sum().to(device)
            nonfinite = nonfinite + b.counts[:, _NONFINITE].sum().to(device, torch.float64)
        has_loss = torch.full_like(zero, float(loss is not None))
        self._live.start(self.step_count, torch.stack([loss_value, has_loss, sumsq, nonfinite]))

    def _write_live(self) -> None:
        done = self._live.finish()
        if done is None:
            return
        step, values = done
        snapshot = HostSnapshot({"live": values})

        def columns() -> dict[str, Any]:
            return {"step": step, "name": list(LIVE_SCALARS), "value": snapshot.wait()["live"]}

        self.writer.submit("scalars", columns)

    @property
    def live_stats(self) -> dict[str, Any] | None:
        """The live mode's latest global view, one step behind: ``{"step": int, name:
        0-d device tensor for each of LIVE_SCALARS}`` (reading a tensor may sync)."""
        if self._live is None or self._live.latest is None:
            return None
        step, values = self._live.latest
        return {"step": step, **dict(zip(LIVE_SCALARS, values.unbind(), strict=True))}

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
        self._graph_batches.clear()
        if self._live is not None:
            self._guard(self._write_live)()
        if getattr(self.model, _ATTACHED, None) is self:
            delattr(self.model, _ATTACHED)
        self.writer.close()

    def __enter__(self) -> Monitor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
