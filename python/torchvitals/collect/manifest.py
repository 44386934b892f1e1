"""The run description each rank writes at start: versions, device, the process-group
layout, the Monitor's configuration, every layer with what is recorded of it, and the
histogram layout."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

import torch
from torch import nn

from torchvitals.collect.distributed import ParamPolicy, layout
from torchvitals.collect.selection import HookSpec
from torchvitals.engine import histogram


def layer_entries(model: nn.Module, hooked: list[HookSpec]) -> list[dict[str, Any]]:
    """Every module with parameters or a hook, in ``named_modules`` order."""
    specs = {spec.name: spec for spec in hooked}
    layers = []
    for name, module in model.named_modules():
        params = {n: list(p.shape) for n, p in module.named_parameters(recurse=False)}
        spec = specs.get(name)
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
    return layers


def build_manifest(
    model: nn.Module,
    hooked: list[HookSpec],
    config: Any,
    *,
    policy: ParamPolicy,
    rank: int,
    world_size: int,
    ddp: nn.Module | None,
    live: bool,
) -> dict[str, Any]:
    from torchvitals import __version__

    first = next(model.parameters(), None)
    edges = histogram.hist_edges()
    return {
        "torchvitals_version": __version__,
        "torch_version": torch.__version__,
        "device": str(first.device) if first is not None else "cpu",
        "world_size": world_size,
        "distributed": layout(
            model.named_parameters(),
            policy,
            rank=rank,
            world_size=world_size,
            ddp=ddp,
            live=live,
        ),
        "config": asdict(config),
        "layers": layer_entries(model, hooked),
        "hist_edges": {
            "labels": list(edges.labels),
            "min_exp": edges.min_exp,
            "max_exp": edges.max_exp,
        },
    }
