"""``manifest.rank{R}.json``: the run description a rank's writer keeps on disk.

Written when the writer starts and rewritten at close with what happened
(``docs/schema.md`` lists every key). Both writes are atomic and never go through a
link (:meth:`torchvitals.store.rundir.RunDirectory.replace`), so a crashed run keeps
its start manifest and a closed one has ``closed_at``. Every manifest carries its own
checksum (``checksum``, :func:`torchvitals.store.layout.manifest_checksum`).
"""

from __future__ import annotations

import datetime as _dt
import os
from collections.abc import Mapping
from typing import Any

from .layout import manifest_bytes, manifest_name
from .rundir import RunDirectory
from .schema import SCHEMA_VERSION

__all__ = ["ManifestFile"]


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="milliseconds")


class ManifestFile:
    """The manifest of one rank: the caller's keys plus the writer's own."""

    def __init__(
        self,
        run_path: str,
        rank: int,
        manifest: Mapping[str, Any],
        settings: dict[str, Any],
        directory: RunDirectory | None = None,
    ):
        self.name = manifest_name(rank)
        self.path = os.path.join(run_path, self.name)
        self.directory = directory if directory is not None else RunDirectory(run_path, rank)
        self._start = dict(manifest)
        self._start["schema_version"] = SCHEMA_VERSION
        self._start["rank"] = rank
        self._start.setdefault("started_at", _now())
        self._start["writer"] = settings

    def _write(self, obj: dict[str, Any]) -> None:
        if self.directory.fd is None:
            self.directory.open()
        self.directory.replace(self.name, manifest_bytes(obj))

    def write_start(self) -> None:
        self._write(self._start)

    def write_closed(
        self,
        *,
        dropped: int,
        write_errors: int,
        rows_written: dict[str, int],
        rows_lost: dict[str, int] | None = None,
        write_retries: int = 0,
        run_dir_lost: int = 0,
        first_segment: dict[str, int] | None = None,
    ) -> None:
        m = dict(self._start)
        m.update(
            closed_at=_now(),
            dropped_batches=dropped,
            write_errors=write_errors,
            rows_written=dict(rows_written),
            rows_lost={t: n for t, n in (rows_lost or {}).items() if n},
            write_retries=write_retries,
            run_dir_lost=run_dir_lost,
            first_segment=dict(first_segment or {}),
        )
        self._write(m)
