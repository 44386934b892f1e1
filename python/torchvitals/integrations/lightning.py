"""A Lightning ``Callback`` that records a run with a :class:`torchvitals.Monitor`.

.. code-block:: python

    from torchvitals.integrations.lightning import TorchvitalsCallback

    trainer = lightning.Trainer(callbacks=[TorchvitalsCallback("runs/exp1")])

When training starts (``on_train_start``) the Monitor is attached to the LightningModule with the
trainer's optimizers, its AMP ``GradScaler`` (if any), global rank and world size
(gradients on rank 0 only under DDP); each optimizer step (after
``accumulate_grad_batches`` batches) ends one Monitor step, with the step's loss; a fit
resumed from a checkpoint (``ckpt_path``) starts at the trainer's global step
(``start_step``: the run directory's earlier rows from that step on are superseded). The
Monitor reads gradients when the optimizer steps, and activations of the step's first
training forward even when ``training_step`` calls submodules rather than
``self(...)``. Keyword arguments are passed to the Monitor and override these.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import torch

try:
    from lightning.pytorch import LightningModule, Trainer
    from lightning.pytorch.callbacks import Callback
except ImportError:  # the older package name
    from pytorch_lightning import LightningModule, Trainer
    from pytorch_lightning.callbacks import Callback

from torchvitals.collect.monitor import Monitor

__all__ = ["TorchvitalsCallback"]


class TorchvitalsCallback(Callback):
    """Records the fit loop to ``path``; ``monitor_kwargs`` go to :class:`Monitor`."""

    def __init__(self, path: str | os.PathLike[str], **monitor_kwargs: Any) -> None:
        self.path = path
        self.monitor_kwargs = monitor_kwargs
        self.monitor: Monitor | None = None
        self._loss: torch.Tensor | None = None
        self._last_step = 0

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # Not on_fit_start: a checkpoint's global step is restored between the two.
        kwargs: dict[str, Any] = {
            "optimizer": list(trainer.optimizers),
            "scaler": getattr(trainer.precision_plugin, "scaler", None),
            "rank": trainer.global_rank,
            "world_size": trainer.world_size,
            # a fit resumed from a checkpoint records a new attempt from its step on
            "start_step": trainer.global_step,
        }
        if isinstance(trainer.strategy.model, torch.nn.parallel.DistributedDataParallel):
            kwargs["grads_on"] = "rank0"  # the Monitor sees the module inside the wrapper
        kwargs.update(self.monitor_kwargs)
        self.monitor = Monitor(pl_module, self.path, **kwargs)
        self._last_step = trainer.global_step
        self._loss = None

    def on_train_batch_start(
        self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self.monitor is not None:
            self.monitor.begin_forward()

    def on_before_backward(
        self, trainer: Trainer, pl_module: LightningModule, loss: torch.Tensor
    ) -> None:
        if self.monitor is not None:
            self.monitor.end_forward()

    def on_train_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        if self.monitor is None:
            return
        loss = outputs.get("loss") if isinstance(outputs, Mapping) else outputs
        if isinstance(loss, torch.Tensor):
            # Lightning divides each batch's loss by accumulate_grad_batches: the sum over
            # the optimizer step's batches is their mean. Kept on the device: no sync.
            loss = loss.detach()
            self._loss = loss if self._loss is None else self._loss + loss
        if trainer.global_step == self._last_step:
            return  # accumulating gradients: no optimizer step yet
        self._last_step = trainer.global_step
        self.monitor.step(loss=self._loss)
        self._loss = None

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage == "fit" and self.monitor is not None:
            self.monitor.close()

    def on_exception(
        self, trainer: Trainer, pl_module: LightningModule, exception: BaseException
    ) -> None:
        if self.monitor is not None:
            self.monitor.close()
