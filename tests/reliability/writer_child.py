"""Child process for test_directory_and_lock.py (not a test module): holds a RunWriter of
rank 0 on RUN_DIR, prints "ready", then writes until killed."""

from __future__ import annotations

import importlib.util
import sys
import time
import types

spec = importlib.util.find_spec("torchvitals")
pkg = types.ModuleType("torchvitals")  # the writer alone: no torch import
pkg.__path__ = list(spec.submodule_search_locations)
sys.modules["torchvitals"] = pkg
from torchvitals.store.writer import RunWriter  # noqa: E402

w = RunWriter(sys.argv[1], manifest={"world_size": 1}, flush_interval=0.01)
w.submit("scalars", {"step": 0, "name": "loss", "value": 0.0})
w.flush()
print("ready", w.path, flush=True)
step = 1
while True:
    w.submit("scalars", {"step": step, "name": "loss", "value": float(step)})
    step += 1
    time.sleep(0.001)
