"""Child process for tests/reliability/test_crash.py (not a test module).

usage: python crash_writer_child.py RUN_DIR MODE
MODE "loop": write forever (the parent SIGKILLs us); after every explicit flush print
    "flushed STEP" meaning every step <= STEP is on disk; "ready" after the first one.
MODE "exit": write 100 steps and return without close(): atexit must flush and close.

Only the writer is imported (not torchvitals/__init__, which pulls in torch): the
writer must not need torch, and the child starts in a fraction of the time.
"""

from __future__ import annotations

import importlib.util
import sys
import time
import types

import numpy as np

spec = importlib.util.find_spec("torchvitals")
pkg = types.ModuleType("torchvitals")
pkg.__path__ = list(spec.submodule_search_locations)
sys.modules["torchvitals"] = pkg
from torchvitals.store.writer import RunWriter  # noqa: E402

LAYERS = [f"block.{i}" for i in range(16)]


def step_items(w: RunWriter, step: int) -> None:
    w.submit("scalars", {"step": step, "name": "loss", "value": float(step)})
    w.submit(
        "layers",
        {
            "step": step,
            "layer": LAYERS,
            "kind": "grad",
            "numel": np.full(16, step),
            "sum": np.full(16, float(step)),
        },
    )
    w.submit(
        "hist", {"step": step, "layer": LAYERS, "kind": "act", "counts": np.full((16, 64), step)}
    )


def main() -> None:
    path, mode = sys.argv[1], sys.argv[2]
    w = RunWriter(
        path,
        manifest={"world_size": 1},
        flush_interval=0.005,
        on_full="block",
        segment_bytes=64 << 10,
    )
    if mode == "exit":
        for step in range(100):
            step_items(w, step)
        return  # no close(): the atexit hook must drain, close and finalize the manifest
    step = 0
    while True:
        step_items(w, step)
        time.sleep(0.0005)  # "training"
        if step % 25 == 24:
            w.flush()
            print(f"flushed {step}", flush=True)
            if step == 24:
                print("ready", flush=True)  # data on disk: the parent may kill us from now on
        step += 1


if __name__ == "__main__":
    main()
