"""The files of a run directory: their names, and how a JSON file is replaced safely.

Shared by the writer and the reader, so that neither imports the other::

    {run}/manifest.rank{R}.json
    {run}/{table}.rank{R}.{seg:06d}.arrows

Every rank writes its own files, so ranks never coordinate (``docs/schema.md``).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from typing import Any

import numpy as np

__all__ = ["MANIFEST_RE", "SEGMENT_RE", "manifest_name", "segment_name", "write_json_atomic"]


#: File names of segments and manifests, the inverse of segment_name and manifest_name.
SEGMENT_RE = re.compile(r"^(?P<table>[A-Za-z0-9_]+)\.rank(?P<rank>\d+)\.(?P<seg>\d+)\.arrows$")
MANIFEST_RE = re.compile(r"^manifest\.rank(?P<rank>\d+)\.json$")


def segment_name(table: str, rank: int, seg: int) -> str:
    """File name of segment ``seg`` of ``table`` written by ``rank``."""
    return f"{table}.rank{rank}.{seg:06d}.arrows"


def manifest_name(rank: int) -> str:
    """File name of the manifest written by ``rank``."""
    return f"manifest.rank{rank}.json"


def _json_default(obj: Any) -> Any:
    # Manifests are built from user config: numpy/torch values, tuples, paths. Anything
    # else is stored as its str() rather than failing the run.
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if type(obj).__module__.startswith("torch") and hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, (set, frozenset, tuple)):
        return list(obj)
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    return str(obj)


def write_json_atomic(path: str, obj: Any) -> None:
    """Write ``obj`` as JSON to ``path`` atomically (temp file, fsync, ``os.replace``).

    A reader, or a crash, sees the old file or the new one, never half of one.
    """
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=2, sort_keys=True, default=_json_default)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
