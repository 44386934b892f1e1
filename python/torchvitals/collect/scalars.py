"""The step's scalars: the loss and user values, each optimizer's learning rates as they
were at its step, the loss scale and skipped steps of a ``GradScaler``. Device values
stay on the device (read later, off the training thread)."""

from __future__ import annotations

from typing import Any

import torch


def _snapshot(value: Any) -> Any:
    return value.detach().clone() if isinstance(value, torch.Tensor) else value


class ScalarReader:
    def __init__(
        self, optimizers: list[torch.optim.Optimizer], scaler: torch.amp.GradScaler | None
    ) -> None:
        self._optimizers = optimizers
        self._scaler = scaler
        self._lrs: dict[int, list[Any]] = {}  # lr of each optimizer at its step
        self._previous_scale = _snapshot(getattr(scaler, "_scale", None))

    def on_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        self._lrs[id(optimizer)] = [_snapshot(g.get("lr")) for g in optimizer.param_groups]

    def read(
        self, loss: Any, scalars: dict[str, Any]
    ) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
        """``(host floats, 0-d float64 device tensors)`` by name."""
        items = {"loss": loss, **scalars} if loss is not None else dict(scalars)
        for k, opt in enumerate(self._optimizers):
            prefix = "lr/" if len(self._optimizers) == 1 else f"lr/opt{k}/"
            lrs = self._lrs.get(id(opt)) or [g.get("lr") for g in opt.param_groups]
            for i, lr in enumerate(lrs):
                items[f"{prefix}group{i}"] = lr
        scaler = self._scaler
        if scaler is not None and scaler.is_enabled():
            scale = getattr(scaler, "_scale", None)
            if scale is None:
                items["loss_scale"] = scaler.get_scale()
            else:
                items["loss_scale"] = scale
                # update() lowers the scale exactly when it skipped the step (its
                # backoff factor is < 1): a comparison on the device, no sync.
                previous = self._previous_scale
                items["skipped_step"] = scale < (
                    previous if previous is not None else scaler._init_scale
                )
                self._previous_scale = scale.clone()  # update() changes it in place
        host: dict[str, float] = {}
        device: dict[str, torch.Tensor] = {}
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

    def next_step(self) -> None:
        self._lrs.clear()
