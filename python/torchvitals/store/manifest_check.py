"""What a manifest read from disk must look like before anything uses it.

:func:`check_manifest` takes the JSON text of ``manifest.rank{R}.json`` and returns the
object, or raises :class:`ManifestError` (a ``ValueError``) naming the file and the key
at fault. Only the keys the reader and the merge use are constrained, with limits, so
that no number in a manifest can size an allocation or a loop (a rank below
``MAX_RANKS``, a world size up to it, bounded lists); every other key is kept as given.
A manifest whose own checksum (``checksum``) does not match is returned with a problem
to warn about: its data may still be right, but a key may have been edited or damaged.
"""

from __future__ import annotations

import json
import math
from typing import Any

from .layout import MANIFEST_CHECKSUM_KEY, MAX_RANKS, MAX_SEGMENTS, manifest_checksum
from .schema import SCHEMA_VERSION, SCHEMAS

__all__ = ["MAX_MANIFEST_BYTES", "ManifestError", "SchemaVersionError", "check_manifest"]

#: A manifest larger than this is refused (the layer table of a 100,000-module model is
#: a few tens of MiB).
MAX_MANIFEST_BYTES = 256 << 20
#: At most this many sharded parameters in a manifest.
MAX_SHARDED = 1 << 20
#: At most this many device meshes, of at most this many dimensions each.
MAX_MESHES = 1 << 12
MAX_MESH_DIMS = 16
#: At most this many attempts (a run resumed in its directory) per rank.
MAX_ATTEMPTS = 1 << 16


class ManifestError(ValueError):
    """A manifest that is not one torchvitals can read: the message names the file."""


class SchemaVersionError(ValueError):
    """The run was written by a newer torchvitals schema than this reader knows."""


def newer_message(path: object, version: int) -> str:
    return (
        f"{path}: written with torchvitals schema version {version}, newer than the newest "
        f"version this torchvitals can read ({SCHEMA_VERSION}); upgrade torchvitals to read it"
    )


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _fail(path: object, what: str) -> ManifestError:
    return ManifestError(f"{path}: not a valid torchvitals manifest ({what})")


def _count(path: object, obj: dict, key: str) -> None:
    value = obj.get(key)
    if value is not None and not (_is_int(value) and value >= 0):
        raise _fail(path, f"{key!r} must be a non-negative integer, got {value!r:.60}")


def _ranks_list(path: object, where: str, value: Any, shape: list[int]) -> None:
    """``value`` is nested lists of ranks of exactly ``shape``."""
    if not shape:
        if not (_is_int(value) and 0 <= value < MAX_RANKS):
            raise _fail(path, f"{where} holds {value!r:.40}, not a rank in [0, {MAX_RANKS})")
        return
    if not isinstance(value, list) or len(value) != shape[0]:
        raise _fail(path, f"{where} must be nested lists of ranks of the mesh's shape")
    for item in value:
        _ranks_list(path, where, item, shape[1:])


def _meshes(path: object, meshes: Any) -> int:
    """Checks ``distributed.meshes``; how many there are."""
    if meshes is None:
        return 0
    if not isinstance(meshes, list) or len(meshes) > MAX_MESHES:
        raise _fail(path, f"'distributed.meshes' must be a list of at most {MAX_MESHES} meshes")
    for i, mesh in enumerate(meshes):
        where = f"'distributed.meshes[{i}]'"
        if not isinstance(mesh, dict):
            raise _fail(path, f"{where} must be an object, got {type(mesh).__name__}")
        shape = mesh.get("shape")
        if not (
            isinstance(shape, list)
            and len(shape) <= MAX_MESH_DIMS
            and all(_is_int(n) and n >= 1 for n in shape)
            and math.prod(shape) <= MAX_RANKS
        ):
            raise _fail(
                path,
                f"{where}.shape must be at most {MAX_MESH_DIMS} positive sizes of at most "
                f"{MAX_RANKS} ranks in all, got {shape!r:.60}",
            )
        first = mesh.get("first_rank")
        if first is not None and not (
            _is_int(first) and first >= 0 and first + math.prod(shape) <= MAX_RANKS
        ):
            raise _fail(
                path,
                f"{where}.first_rank must be a rank with the mesh below {MAX_RANKS}, "
                f"got {first!r:.40}",
            )
        if first is None and mesh.get("ranks") is not None:
            _ranks_list(path, f"{where}.ranks", mesh["ranks"], shape)
    return len(meshes)


def _distributed(path: object, dist: Any) -> None:
    if dist is None:
        return
    if not isinstance(dist, dict):
        raise _fail(path, f"'distributed' must be an object, got {type(dist).__name__}")
    grads_on = dist.get("grads_on")
    if grads_on is not None and not isinstance(grads_on, str):
        raise _fail(path, f"'distributed.grads_on' must be a string, got {grads_on!r:.60}")
    meshes = _meshes(path, dist.get("meshes"))
    sharded = dist.get("sharded")
    if sharded is None:
        return
    if not isinstance(sharded, dict):
        raise _fail(path, f"'distributed.sharded' must be an object, got {type(sharded).__name__}")
    if len(sharded) > MAX_SHARDED:
        raise _fail(
            path, f"'distributed.sharded' has {len(sharded)} entries (at most {MAX_SHARDED})"
        )
    limit = MAX_RANKS  # not the world size: a caller may give a rank above it
    for name, entry in sharded.items():
        where = f"'distributed.sharded[{name!r:.80}]'"
        if not isinstance(entry, dict):
            raise _fail(path, f"{where} must be an object, got {type(entry).__name__}")
        mesh = entry.get("mesh")
        if mesh is not None and not (_is_int(mesh) and 0 <= mesh < meshes):
            raise _fail(path, f"{where}.mesh is {mesh!r:.40}, not an index into 'meshes'")
        placements = entry.get("placements")
        if placements is not None and not (
            isinstance(placements, list)
            and len(placements) <= MAX_MESH_DIMS
            and all(isinstance(p, str) for p in placements)
        ):
            raise _fail(
                path, f"{where}.placements must be a list of at most {MAX_MESH_DIMS} strings"
            )
        ranks = entry.get("recorded_by")  # written before schema version 3
        if ranks is None:
            continue
        if not isinstance(ranks, list) or len(ranks) > limit:
            raise _fail(path, f"{where}.recorded_by must be a list of at most {limit} ranks")
        for r in ranks:
            if not (_is_int(r) and 0 <= r < limit):
                raise _fail(
                    path, f"{where}.recorded_by holds {r!r:.40}, not a rank in [0, {limit})"
                )


def _closing(path: object, obj: dict, where: str) -> None:
    """``closed_at``, ``rows_written``, ``rows_lost`` and ``first_segment`` of the manifest
    or of one of its ``attempts`` (``where``)."""
    closed = obj.get("closed_at")
    if closed is not None and not isinstance(closed, str):
        raise _fail(path, f"'{where}closed_at' must be a string, got {closed!r:.40}")
    for key in ("rows_written", "rows_lost", "first_segment"):
        rows = obj.get(key)
        if rows is None:
            continue
        name = f"'{where}{key}'"
        if not isinstance(rows, dict) or not all(
            isinstance(t, str) and _is_int(n) and n >= 0 for t, n in rows.items()
        ):
            raise _fail(path, f"{name} must map table names to non-negative integers")
        if key == "first_segment" and any(n >= MAX_SEGMENTS for n in rows.values()):
            raise _fail(path, f"{name} holds a segment number of {MAX_SEGMENTS} or more")
        unknown = sorted(set(rows) - set(SCHEMAS))
        if unknown:
            raise _fail(path, f"{name} names unknown table(s) {unknown}")


def _attempts(path: object, obj: dict) -> None:
    """``attempts`` (schema version 3): one object per attempt, index = attempt number,
    with the step it starts at; ``attempt`` is the writer's own."""
    attempts = obj.get("attempts")
    if attempts is None:
        if obj.get("attempt") not in (None, 0):
            raise _fail(path, f"'attempt' is {obj.get('attempt')!r:.40} without 'attempts'")
        return
    if not isinstance(attempts, list) or not 1 <= len(attempts) <= MAX_ATTEMPTS:
        raise _fail(path, f"'attempts' must be a list of 1 to {MAX_ATTEMPTS} attempts")
    for i, entry in enumerate(attempts):
        if not isinstance(entry, dict):
            raise _fail(path, f"'attempts[{i}]' must be an object, got {type(entry).__name__}")
        start = entry.get("start_step")
        if start is not None and not (_is_int(start) and -(2**63) <= start < 2**63):
            raise _fail(path, f"'attempts[{i}].start_step' must be a step, got {start!r:.40}")
        _closing(path, entry, f"attempts[{i}].")
    own = obj.get("attempt", len(attempts) - 1)
    if not (_is_int(own) and 0 <= own < len(attempts)):
        raise _fail(path, f"'attempt' is {own!r:.40}, not an index into 'attempts'")


def check_manifest(text: bytes, path: object, rank: int) -> tuple[dict, list[str]]:
    """The manifest in ``text`` (the file ``path`` of rank ``rank``) and its problems to
    warn about; raises :class:`ManifestError` or :class:`SchemaVersionError`."""
    try:
        obj = json.loads(text.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise _fail(path, f"not JSON: not UTF-8 text: {exc}") from None
    except RecursionError:
        raise _fail(path, "not JSON: nested too deeply") from None
    except ValueError as exc:  # JSONDecodeError, and integers too long to convert
        raise _fail(path, f"not JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise _fail(path, f"expected a JSON object, got {type(obj).__name__}")
    version = obj.get("schema_version")
    if not _is_int(version) or version < 1:
        raise _fail(path, "schema_version missing or not a positive integer")
    if version > SCHEMA_VERSION:
        raise SchemaVersionError(newer_message(path, version))
    own = obj.get("rank", rank)
    if not _is_int(own) or own != rank:
        raise _fail(path, f"'rank' is {own!r:.40} but the file name says rank {rank}")
    world = obj.get("world_size")
    if world is not None and not (_is_int(world) and 1 <= world <= MAX_RANKS):
        raise _fail(path, f"'world_size' must be an integer in [1, {MAX_RANKS}], got {world!r:.40}")
    _distributed(path, obj.get("distributed"))
    _closing(path, obj, "")
    for key in ("dropped_batches", "write_errors", "write_retries", "run_dir_lost"):
        _count(path, obj, key)
    _attempts(path, obj)
    problems = []
    written = obj.get(MANIFEST_CHECKSUM_KEY)
    if written is None:
        # Manifests written before checksums have none; one whose key was damaged still
        # has the value somewhere.
        stray = [k for k, v in obj.items() if isinstance(v, str) and v.startswith("crc32:")]
        if stray:
            problems.append(
                f"torchvitals: manifest {path} has a checksum under the key {stray[0]!r:.40} "
                f"instead of {MANIFEST_CHECKSUM_KEY!r}: it was damaged; its keys may be wrong"
            )
    elif written != manifest_checksum(obj):
        problems.append(
            f"torchvitals: manifest {path} does not match its checksum ({written!s:.40}): it "
            "was edited or damaged after it was written; its keys may be wrong"
        )
    return obj, problems
