"""The pre-flight report of a run, ``{run}/preflight.json``: written by
``torchvitals.preflight(..., monitor=mon)`` next to the manifests, read by the reports.

The file is a plain JSON object (``PreflightReport.to_dict``); this module only moves it
to and from disk, so the store never imports the code that produced it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from .layout import read_regular_file, write_json_atomic

__all__ = ["PREFLIGHT_NAME", "read_preflight", "write_preflight"]

PREFLIGHT_NAME = "preflight.json"
#: A pre-flight report larger than this is refused.
MAX_PREFLIGHT_BYTES = 64 << 20


def write_preflight(run_dir: str | os.PathLike[str], report: dict[str, Any]) -> Path:
    """Writes ``report`` to ``run_dir/preflight.json`` atomically; returns the path."""
    path = Path(run_dir) / PREFLIGHT_NAME
    write_json_atomic(str(path), report)
    return path


def read_preflight(run_dir: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The pre-flight report stored in ``run_dir``, or ``None`` when the run has none.
    Raises ``ValueError`` (naming the file) when the file is not a JSON object."""
    path = Path(run_dir) / PREFLIGHT_NAME
    try:  # a regular file only (a FIFO or a device is refused without blocking), bounded
        text = read_regular_file(path, MAX_PREFLIGHT_BYTES).decode("utf-8")
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:  # not regular, too large, not UTF-8
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise ValueError(f"{path}: not a readable pre-flight report ({why})") from exc
    try:
        obj = json.loads(text)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, too deep, too long
        raise ValueError(f"{path}: not a valid pre-flight report (not JSON: {exc})") from exc
    if not isinstance(obj, dict):
        raise ValueError(
            f"{path}: not a valid pre-flight report (expected a JSON object, "
            f"got {type(obj).__name__})"
        )
    return obj
