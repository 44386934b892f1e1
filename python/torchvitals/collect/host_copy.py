"""Moving one step's statistics off the GPU without making the training thread wait."""

from __future__ import annotations

import numpy as np
import torch


class HostCopy:
    """Copies device tensors into pinned host memory with non-blocking copies on each
    device's current stream and records an event per device; only the writer thread
    ever waits on them."""

    def __init__(self, tensors: dict[str, torch.Tensor]) -> None:
        self._host: dict[str, torch.Tensor] = {}
        devices = set()
        for key, t in tensors.items():
            if t.device.type == "cuda":
                host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
                host.copy_(t, non_blocking=True)
                self._host[key] = host
                devices.add(t.device)
            else:
                self._host[key] = t
        self._events = []
        for device in devices:
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(device))
            self._events.append(event)
        self._arrays: dict[str, np.ndarray] | None = None

    def wait(self) -> dict[str, np.ndarray]:
        """Blocks until the copies landed (call it off the training thread); the arrays
        by key, the same on every call."""
        if self._arrays is None:
            for event in self._events:
                event.synchronize()
            self._arrays = {key: t.numpy() for key, t in self._host.items()}
        return self._arrays
