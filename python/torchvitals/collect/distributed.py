"""What the Monitor needs to know about torch.distributed, and nothing home-made.

- :func:`layout`: the process-group layout written to each rank's manifest (rank, world
  size, backend, torchrun's local/node ranks, the DDP group, the device meshes and the
  placement of every sharded parameter), which :mod:`torchvitals.store.merge` reads back.
  It grows with the parameters this rank holds, not with the world size: the ranks that
  record a parameter are derived from its mesh and placements when the run is read.
- :class:`ParamPolicy`: which parameters this rank records, and the tensor it measures.
  A DTensor (FSDP2 ``fully_shard``, tensor parallel) is measured through ``to_local()``,
  the local shard, with no communication; of the ranks holding identical copies (a
  ``Replicate`` mesh dimension) only the one at coordinate 0 records it, so every element
  of every parameter is recorded exactly once. Plain parameters are recorded on every
  rank, or on rank 0 only when they are replicas (DDP, or plain leftovers of a sharded
  model).
- :class:`LiveReducer`: the optional live mode, one asynchronous ``all_reduce`` of a
  4-element vector per step.
"""

from __future__ import annotations

import os
import socket
import sys
from collections.abc import Iterable
from typing import Any, Literal

import torch
from torch import nn

from torchvitals.engine.derived import gradient_totals, norm
from torchvitals.store import merge

GradsOn = Literal["auto", "rank0", "all"]

#: Names of the scalars the live mode writes.
LIVE_SCALARS = ("global/loss", "global/grad_norm", "global/grad_nonfinite")


def initialized() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def is_dtensor(t: Any) -> bool:
    # Plain tensors and parameters are told apart by their type alone: the lookup below
    # reads sys.modules, which Dynamo traces in a compiled optimizer step, and another
    # thread's import changing it mid-trace fails the compile ("dictionary changed size
    # during iteration"), again at every step.
    if type(t) in (torch.Tensor, nn.Parameter):
        return False
    # Importing torch.distributed.tensor costs about a second; a DTensor can only
    # exist once something else has imported it (torch >= 2.5 or the older path).
    for module in ("torch.distributed.tensor", "torch.distributed._tensor"):
        cls = getattr(sys.modules.get(module), "DTensor", None)
        if cls is not None:
            return isinstance(t, cls)
    return False


def _is_compiled(model: nn.Module) -> bool:
    cls = getattr(sys.modules.get("torch._dynamo.eval_frame"), "OptimizedModule", None)
    return cls is not None and isinstance(model, cls)


def unwrap(model: nn.Module) -> tuple[nn.Module, nn.Module | None]:
    """``(module to hook, DDP wrapper or None)``: hooks and names go on the module inside
    ``DistributedDataParallel`` and ``torch.compile``, so layer names are the plain
    model's (no ``module.`` or ``_orig_mod.`` prefix) on every rank."""
    ddp = None
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            ddp, model = model, model.module
        elif _is_compiled(model):
            model = model._orig_mod
        else:
            return model, ddp


def recording_ranks(mesh_ranks: torch.Tensor, placements: Iterable[Any]) -> list[int]:
    """Global ranks that record a DTensor: those at coordinate 0 of every mesh dimension
    along which it is replicated (the merge derives the same from the manifest)."""
    replicated = [placement.is_replicate() for placement in placements]
    return merge.recording_ranks(mesh_ranks.cpu().numpy(), replicated)


class ParamPolicy:
    """Which parameters this rank records; see the module docstring."""

    def __init__(self, model: nn.Module, rank: int, grads_on: GradsOn, ddp: bool) -> None:
        if grads_on not in ("auto", "rank0", "all"):
            raise ValueError(f"grads_on must be 'auto', 'rank0' or 'all', got {grads_on!r}")
        self.sharded = any(is_dtensor(p) for p in model.parameters())
        if grads_on == "auto":
            grads_on = "rank0" if ddp or self.sharded else "all"
        self.grads_on = grads_on
        self.rank = rank
        self._records: dict[int, bool] = {}
        # Decided up front: a cache filled during training would change under a compiled
        # optimizer step, and Dynamo, which guards on it, would recompile.
        for p in model.parameters():
            self.records(p)

    def records(self, p: torch.Tensor) -> bool:
        known = self._records.get(id(p))
        if known is None:
            if is_dtensor(p):
                known = self.rank in recording_ranks(p.device_mesh.mesh, p.placements)
            else:
                known = self.grads_on == "all" or self.rank == 0
            self._records[id(p)] = known
        return known

    def local(self, p: torch.Tensor, t: torch.Tensor) -> torch.Tensor | None:
        """The tensor to measure for ``t`` (``p``'s gradient or value), or None when this
        rank does not record ``p``."""
        if not self.records(p):
            return None
        return t.to_local() if is_dtensor(t) else t


def _mesh_entry(mesh: Any) -> dict[str, Any]:
    ranks = mesh.mesh.cpu()
    entry = {
        "shape": list(ranks.shape),
        "dim_names": list(mesh.mesh_dim_names or ()),
        "coordinate": mesh.get_coordinate(),
    }
    flat = ranks.flatten()
    first = int(flat[0]) if flat.numel() else 0
    # A mesh of consecutive ranks (the usual one) is two numbers, not world_size of them.
    if torch.equal(flat, torch.arange(first, first + flat.numel(), dtype=flat.dtype)):
        entry["first_rank"] = first
    else:
        entry["ranks"] = ranks.tolist()
    return entry


def layout(
    named_params: Iterable[tuple[str, torch.Tensor]],
    policy: ParamPolicy,
    *,
    rank: int,
    world_size: int,
    ddp: nn.Module | None,
    live: bool,
) -> dict[str, Any]:
    """The ``distributed`` entry of the manifest."""
    env = os.environ
    out: dict[str, Any] = {
        "initialized": initialized(),
        "backend": str(torch.distributed.get_backend()) if initialized() else None,
        "rank": rank,
        "world_size": world_size,
        "local_rank": int(env["LOCAL_RANK"]) if "LOCAL_RANK" in env else None,
        "local_world_size": int(env["LOCAL_WORLD_SIZE"]) if "LOCAL_WORLD_SIZE" in env else None,
        "node_rank": int(env["GROUP_RANK"]) if "GROUP_RANK" in env else None,
        "hostname": socket.gethostname(),
        "wrapper": type(ddp).__name__ if ddp is not None else None,
        "grads_on": policy.grads_on,
        "live": live,
    }
    if ddp is not None and initialized():
        group = getattr(ddp, "process_group", None)
        out["ddp_group_ranks"] = torch.distributed.get_process_group_ranks(
            group or torch.distributed.group.WORLD
        )
    meshes: list[Any] = []
    sharded: dict[str, Any] = {}
    for name, p in named_params:
        if not is_dtensor(p):
            continue
        mesh = p.device_mesh
        if mesh not in meshes:
            meshes.append(mesh)
        sharded[name] = {
            "mesh": meshes.index(mesh),
            "placements": [repr(pl) for pl in p.placements],
            "local_shape": list(p.to_local().shape),
        }
    out["meshes"] = [_mesh_entry(m) for m in meshes]
    out["sharded"] = sharded
    return out


class LiveReducer:
    """The live mode: each step, one asynchronous ``all_reduce`` (sum) of
    ``[loss, 1 if a loss was given, grad sum of squares, grad non-finite count]``.

    It is waited for at the next step (NCCL: the wait only orders the current stream
    after it; gloo: it has had a whole step to finish), so telemetry adds no blocking
    collective to the step. Every rank must call :meth:`start` equally often.
    """

    def __init__(self, group: Any = None) -> None:
        self.group = group
        self._pending: tuple[int, torch.Tensor, Any] | None = None
        self.latest: tuple[int, torch.Tensor] | None = None  #: what finish() last returned

    def start(self, step: int, loss: Any, grads: Iterable[Any], device: torch.device) -> None:
        """Starts the reduction of this rank's part of ``step``: its loss (a tensor, a
        number or None) and its gradient reductions' totals."""
        zero = torch.zeros((), dtype=torch.float64, device=device)
        if isinstance(loss, torch.Tensor):
            loss_value = loss.detach().reshape(()).to(device, torch.float64)
        else:
            loss_value = zero if loss is None else torch.full_like(zero, float(loss))
        sumsq, nonfinite = zero, zero
        for r in grads:
            r_sumsq, r_nonfinite = gradient_totals(r.moments, r.counts)
            sumsq = sumsq + r_sumsq.to(device)
            nonfinite = nonfinite + r_nonfinite.to(device, torch.float64)
        has_loss = torch.full_like(zero, float(loss is not None))
        vector = torch.stack([loss_value, has_loss, sumsq, nonfinite])
        work = torch.distributed.all_reduce(vector, group=self.group, async_op=True)
        self._pending = (step, vector, work)

    def finish(self) -> tuple[int, torch.Tensor] | None:
        """Waits for the pending reduction; ``(step, global scalars)`` as a device tensor
        in the order of ``LIVE_SCALARS``, or None."""
        if self._pending is None:
            return None
        step, vector, work = self._pending
        self._pending = None
        work.wait()
        loss = vector[0] / vector[1]  # NaN when no rank gave a loss
        self.latest = (step, torch.stack([loss, norm(vector[2]), vector[3]]))
        return self.latest
