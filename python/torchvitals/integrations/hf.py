"""A Hugging Face ``TrainerCallback`` that records a run with a :class:`torchvitals.Monitor`.

.. code-block:: python

    from torchvitals.integrations.hf import TorchvitalsCallback

    trainer = transformers.Trainer(..., callbacks=[TorchvitalsCallback("runs/exp1")])

At ``on_train_begin`` the Monitor is attached to the (unwrapped) model with the
Trainer's optimizer (unwrapped from Accelerate's ``AcceleratedOptimizer``, whose AMP
``GradScaler`` it also takes), the process index and world size (gradients on rank 0
only under DDP); ``on_step_end``, once per optimizer step, ends one Monitor step. Training
resumed from a checkpoint starts at its global step (``start_step``: the run directory's
earlier rows from that step on are superseded). The
Monitor reads gradients when the optimizer steps, so after the Trainer's clipping.

The recorded ``loss`` is the one the Trainer logs for the step, kept on the device:
the model's ``loss`` output of each micro-batch, averaged over the gradient
accumulation steps (summed when the model received ``num_items_in_batch`` and so
already normalized its loss over the accumulated batch, times the world size when
``average_tokens_across_devices`` made that count global). Keyword arguments are passed
to the Monitor and override these.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from torchvitals.collect.monitor import Monitor

__all__ = ["TorchvitalsCallback"]


def _unwrap_optimizer(optimizer: Any) -> Any:
    # accelerate's AcceleratedOptimizer subclasses Optimizer without its hook state
    while isinstance(getattr(optimizer, "optimizer", None), torch.optim.Optimizer):
        optimizer = optimizer.optimizer
    return optimizer


class TorchvitalsCallback(TrainerCallback):
    """Records ``Trainer.train()`` to ``path``; ``monitor_kwargs`` go to :class:`Monitor`."""

    def __init__(self, path: str | os.PathLike[str], **monitor_kwargs: Any) -> None:
        self.path = path
        self.monitor_kwargs = monitor_kwargs
        self.monitor: Monitor | None = None
        self._losses: list[torch.Tensor] = []
        self._normalized = False
        self._loss_scale = 1
        self._handle: Any = None

    def on_train_begin(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        model: nn.Module | None = None,
        optimizer: Any = None,
        **kwargs: Any,
    ) -> None:
        settings: dict[str, Any] = {
            "optimizer": _unwrap_optimizer(optimizer),
            "scaler": getattr(optimizer, "scaler", None),
            "rank": args.process_index,
            "world_size": args.world_size,
            # train(resume_from_checkpoint=...) records a new attempt from its step on
            "start_step": state.global_step,
        }
        if args.world_size > 1 and not args.fsdp and not args.deepspeed:
            settings["grads_on"] = "rank0"  # DDP: the Monitor sees the model inside it
        settings.update(self.monitor_kwargs)
        self.monitor = Monitor(model, self.path, **settings)
        average = getattr(args, "average_tokens_across_devices", False)
        self._loss_scale = args.world_size if average and args.world_size > 1 else 1
        self._handle = model.register_forward_hook(self._capture_loss, with_kwargs=True)

    def _capture_loss(
        self, module: nn.Module, args: Any, kwargs: dict[str, Any], output: Any
    ) -> None:
        if not module.training or not torch.is_grad_enabled():
            return
        loss = output.get("loss") if isinstance(output, Mapping) else None
        if isinstance(loss, torch.Tensor):
            self._losses.append(loss.detach().float())
            self._normalized = kwargs.get("num_items_in_batch") is not None

    def on_step_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if self.monitor is None:
            return
        loss = None
        if self._losses:
            total = torch.stack(self._losses).sum()
            loss = total * self._loss_scale if self._normalized else total / len(self._losses)
        self._losses.clear()
        self.monitor.step(loss=loss)

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        if self.monitor is not None:
            self.monitor.close()
