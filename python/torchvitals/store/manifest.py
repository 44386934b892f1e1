"""``manifest.rank{R}.json``: the run description a rank's writer keeps on disk.

Written when the writer starts and rewritten at close with what happened
(``docs/schema.md`` lists every key). Both writes are atomic and never go through a
link (:meth:`torchvitals.store.rundir.RunDirectory.replace`), so a crashed run keeps
its start manifest and a closed one has ``closed_at``. Every manifest carries its own
checksum (``checksum``, :func:`torchvitals.store.layout.manifest_checksum`).

Attempts: a writer opened on a directory where its rank already wrote (a job restarted,
from a checkpoint or not) continues the run as the next *attempt* (:meth:`ManifestFile.
begin_attempt`). The manifest lists every attempt (``attempts``, index = attempt number)
with the step it starts at; each row carries its attempt; the reader keeps, per step,
the latest attempt's rows (:func:`torchvitals.store.merge.supersede`). The top-level
``rows_written`` and ``first_segment`` are the current attempt's.
"""

from __future__ import annotations

import datetime as _dt
import os
import stat
import warnings
from collections.abc import Mapping
from typing import Any

import numpy as np
import pyarrow.compute as pc

from .layout import manifest_bytes, manifest_name, parse_segment_file, read_regular_file
from .manifest_check import MAX_MANIFEST_BYTES, check_manifest
from .rundir import RunDirectory
from .schema import SCHEMA_VERSION, SCHEMAS

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
        self.rank = rank
        self.path = os.path.join(run_path, self.name)
        self.directory = directory if directory is not None else RunDirectory(run_path, rank)
        self._start = dict(manifest)
        self._start["schema_version"] = SCHEMA_VERSION
        self._start["rank"] = rank
        self._start.setdefault("started_at", _now())
        self._start["writer"] = settings

    @property
    def attempt(self) -> int:
        """This writer's attempt: 0 in a new run directory."""
        return self._start.get("attempt", 0)

    @property
    def start_step(self) -> int:
        """The step this attempt starts at."""
        return self._start["attempts"][-1]["start_step"] if "attempts" in self._start else 0

    def begin_attempt(self, start_step: int | None) -> None:
        """Make this writer the next attempt of its rank in the (open, locked) directory.

        ``start_step``: the step training resumes at (from a checkpoint); the earlier
        attempts' rows from that step on are superseded. None: the run goes on after the
        last step recorded, with a warning when there was one (the training loop may
        really be starting over)."""
        attempts, unreadable = self._earlier_attempts()
        last_attempt, last_step = None, None
        if unreadable or start_step is None:
            last_attempt, last_step = last_recorded(self.directory, self.rank)
        if last_attempt is not None and last_attempt >= len(attempts):
            # the data shows attempts the manifest does not list (it was lost or damaged)
            attempts += [{"start_step": None}] * (last_attempt + 1 - len(attempts))
        start = start_step
        if start is None:
            start = 0 if last_step is None else last_step + 1
            if attempts:
                warnings.warn(
                    f"torchvitals: {self.directory.path} already holds {len(attempts)} "
                    f"attempt(s) of rank {self.rank}"
                    + ("" if last_step is None else f" (last step {last_step})")
                    + f"; this one (attempt {len(attempts)}) continues the run at step "
                    f"{start}. When training resumes from a checkpoint, pass its step "
                    "(Monitor(..., start_step=k)): the earlier attempts' rows from step k on "
                    "are then superseded",
                    RuntimeWarning,
                    stacklevel=4,
                )
        self._start["attempt"] = len(attempts)
        self._start["attempts"] = [
            *attempts,
            {"start_step": int(start), "started_at": self._start["started_at"]},
        ]

    def _earlier_attempts(self) -> tuple[list[dict[str, Any]], bool]:
        """The attempts the manifest in the directory lists, and whether it could not be
        read (then the data tells how many attempts there were)."""
        try:
            if not stat.S_ISREG(os.lstat(self.path).st_mode):
                return [], True  # a link or no file at all: writing the manifest says so
            text = read_regular_file(self.path, MAX_MANIFEST_BYTES)
        except FileNotFoundError:
            return [], False
        except (OSError, ValueError):
            return [], True
        try:
            m, _problems = check_manifest(text, self.path, self.rank)
        except ValueError as exc:
            warnings.warn(
                f"torchvitals: the manifest of an earlier attempt cannot be read ({exc}); "
                "this writer replaces it and counts the attempts from the data",
                RuntimeWarning,
                stacklevel=5,
            )
            return [], True
        attempts = m.get("attempts")
        if attempts is not None:
            return [dict(e) for e in attempts], False
        # written before schema version 3: one attempt, described by the manifest itself
        keys = ("started_at", "closed_at", "rows_written", "first_segment")
        return [{"start_step": None, **{k: m[k] for k in keys if k in m}}], False

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
        if "attempts" in m:
            this = m["attempts"][-1]
            m["attempts"] = [
                *m["attempts"][:-1],
                {
                    **this,
                    "closed_at": m["closed_at"],
                    "rows_written": m["rows_written"],
                    "first_segment": m["first_segment"],
                },
            ]
        self._write(m)


def last_recorded(directory: RunDirectory, rank: int) -> tuple[int | None, int | None]:
    """``(latest attempt, its last step)`` in the rows ``rank`` has in the directory, or
    ``(None, None)``. Only each table's last segment with rows is read: an attempt writes
    its steps in order, after the earlier attempts' segments."""
    from .reader import read_segment_file  # the reader imports the writer's modules

    found: dict[str, list[tuple[int, str]]] = {}
    for name in directory.names():
        parsed = parse_segment_file(name)
        if parsed is not None and parsed[1] == rank and parsed[0] in SCHEMAS:
            found.setdefault(parsed[0], []).append((parsed[2], name))
    best: tuple[int, int] | None = None  # (attempt, step)
    for segments in found.values():
        for _seg, name in sorted(segments, reverse=True):
            try:
                data, _damage = read_segment_file(os.path.join(directory.path, name))
            except (OSError, ValueError):
                continue  # unreadable: the reader will say so; look further back
            if not data.num_rows:
                continue
            step = data.column("step").to_numpy()
            # rows written before schema version 3 have no attempt: the first
            attempt = pc.fill_null(data.column("attempt"), 0).to_numpy().astype(np.int64)
            latest = int(attempt.max())
            candidate = (latest, int(step[attempt == latest].max()))
            best = candidate if best is None else max(best, candidate)
            break
    return (None, None) if best is None else best
