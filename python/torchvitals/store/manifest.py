"""``manifest.rank{R}.json``: the run description a rank's writer keeps on disk.

Written when the writer starts and rewritten at close with what happened
(``docs/schema.md`` lists every key). Both writes are atomic, so a crashed run keeps
its start manifest and a closed one has ``closed_at``.
"""

from __future__ import annotations

import datetime as _dt
import os
from collections.abc import Mapping
from typing import Any

from .layout import manifest_name, write_json_atomic
from .schema import SCHEMA_VERSION

__all__ = ["ManifestFile"]


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="milliseconds")


class ManifestFile:
    """The manifest of one rank: the caller's keys plus the writer's own."""

    def __init__(
        self, run_path: str, rank: int, manifest: Mapping[str, Any], settings: dict[str, Any]
    ):
        self.path = os.path.join(run_path, manifest_name(rank))
        self._start = dict(manifest)
        self._start["schema_version"] = SCHEMA_VERSION
        self._start["rank"] = rank
        self._start.setdefault("started_at", _now())
        self._start["writer"] = settings

    def write_start(self) -> None:
        write_json_atomic(self.path, self._start)

    def write_closed(
        self, *, dropped: int, write_errors: int, rows_written: dict[str, int]
    ) -> None:
        m = dict(self._start)
        m.update(
            closed_at=_now(),
            dropped_batches=dropped,
            write_errors=write_errors,
            rows_written=dict(rows_written),
        )
        write_json_atomic(self.path, m)
