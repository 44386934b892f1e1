"""A hostile preflight.json (read by `torchvitals report`) is a clear error, never a hang."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from harness import _env

CODE = """
import importlib.util, sys, types
spec = importlib.util.find_spec("torchvitals")
pkg = types.ModuleType("torchvitals")  # the store alone: no torch import
pkg.__path__ = list(spec.submodule_search_locations)
sys.modules["torchvitals"] = pkg
from torchvitals.store.preflight_file import read_preflight
try:
    read_preflight(sys.argv[1])
except ValueError as exc:
    print("ValueError:", exc)
"""


@pytest.mark.parametrize("kind", ["fifo", "dev_zero", "directory", "deep_json"])
def test_hostile_preflight_file(tmp_path, kind):
    target = tmp_path / "preflight.json"
    if kind == "fifo":
        os.mkfifo(target)
    elif kind == "dev_zero":
        target.symlink_to("/dev/zero")
    elif kind == "directory":
        target.mkdir()
    else:
        target.write_text("[" * 100_000 + "]" * 100_000)
    out = subprocess.run(
        [sys.executable, "-c", CODE, str(tmp_path)],
        capture_output=True, text=True, timeout=60, env=_env(),
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.startswith("ValueError:") and str(target) in out.stdout
