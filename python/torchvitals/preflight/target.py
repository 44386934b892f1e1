"""What ``torchvitals preflight module:function`` checks: ``function``, imported from a
module (``pkg.train:setup``) or a file (``scripts/train.py:setup``), is called with no
arguments and returns ``(model, batch, loss_fn)``, ``(model, batch, loss_fn, optimizer)``
or a dict of :func:`torchvitals.preflight`'s arguments."""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

#: The arguments a target's dict may hold.
ARGUMENTS = ("model", "batch", "loss_fn", "step_fn", "optimizer", "num_classes")
_POSITIONAL = ("model", "batch", "loss_fn", "optimizer")


def _import(where: str) -> ModuleType:
    if where.endswith(".py") or "/" in where or os.sep in where:
        path = Path(where)
        if not path.is_file():
            raise FileNotFoundError(f"no such file: {path}")
        sys.path.insert(0, str(path.parent.resolve()))  # its own imports, as `python file.py`
        spec = importlib.util.spec_from_file_location(path.stem, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())  # modules of the current directory, as `python -m`
    try:
        return importlib.import_module(where)
    except ModuleNotFoundError as exc:
        if exc.name and where.startswith(exc.name):
            raise ValueError(f"cannot import module {where!r}: {exc}") from exc
        raise


def arguments_of(result: object, target: str) -> dict[str, Any]:
    """The preflight arguments in what ``target``'s function returned."""
    if isinstance(result, dict):
        unknown = sorted(set(result) - set(ARGUMENTS))
        if unknown:
            raise ValueError(f"{target} returned unknown keys {unknown}; known: {list(ARGUMENTS)}")
        return dict(result)
    if isinstance(result, (tuple, list)) and len(result) in (3, 4):
        return dict(zip(_POSITIONAL, result, strict=False))
    raise ValueError(
        f"{target} returned {type(result).__name__}; expected (model, batch, loss_fn), "
        f"(model, batch, loss_fn, optimizer) or a dict with keys from {list(ARGUMENTS)}"
    )


def load_target(target: str) -> dict[str, Any]:
    """Imports ``module:function`` (or ``path/file.py:function``), calls the function and
    returns the preflight arguments it gave."""
    where, sep, name = target.rpartition(":")
    if not sep or not where or not name:
        raise ValueError(
            f"target must be module:function or path/to/file.py:function, got {target!r}"
        )
    function = getattr(_import(where), name, None)
    if not callable(function):
        raise ValueError(f"{where} has no function {name!r}")
    return arguments_of(function(), target)
