"""Exact merge of a run's ranks: the ``merge`` step of :func:`torchvitals.store.reader.load_run`.

Every rank writes its own rows; merging is done here, offline, with no communication
during training. What is merged:

- **Sharded parameters** (DTensor: FSDP2 ``fully_shard``, tensor parallel). Each rank
  records the ``grad`` and ``weight`` rows of its local shard under the parameter's
  name; the manifests give, per parameter, its device mesh and placements
  (``distributed.sharded[name]``), from which :func:`shard_holders` derives the ranks
  that record a shard (older manifests list them, ``recorded_by``). The shards' rows
  of one step combine exactly into one row of the whole parameter, with
  ``rank = MERGED_RANK`` (-1, "all ranks"): ``numel, nan, inf, zeros, saturated, units,
  dead_units, saturated_units, large, sum, sumsq`` add, ``max_abs`` is the max,
  histogram ``counts`` add. So the merged norm ``sqrt(sumsq)`` is the norm of the full
  gradient.
- **Everything else stays per rank**: activations and activation gradients (each rank
  sees its own slice of the batch), plain parameters (under DDP recorded by rank 0
  only), scalars.
- **Global gradient norm**: when parameters are sharded and every rank recorded plain
  parameters on rank 0 only (``grads_on="rank0"``, the default then), the scalars get
  ``grad_norm`` (``sqrt`` of the sum of the ranks' squares) and ``grad_nonfinite`` (sum)
  rows with ``rank = -1``.

Missing ranks: a rank that wrote nothing, or has no data for steps other ranks
recorded (killed, or records dropped), is reported with a :class:`MissingRanksWarning`
naming the rank(s) and the steps. Shards of a step with a rank missing cannot be
combined: those rows are kept unmerged, with their own rank and ``shards_complete``
0 (the merged rows have 1, every other row null), so a ``rank = -1`` row is
always a complete parameter and a partial one is never taken for a whole one:
:func:`whole_layer_rows` leaves the partial rows out. :func:`rank_coverage` gives the
same report as data.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from torchvitals.engine.derived import norm
from torchvitals.store.schema import LAYER_STATS, SCHEMAS, dictionary_codes, empty_table

__all__ = [
    "MERGED_RANK",
    "PARAM_KINDS",
    "SUPERSEDED_KEY",
    "MissingRanksWarning",
    "RankCoverage",
    "Superseded",
    "SupersededRowsWarning",
    "merge_ranks",
    "rank_coverage",
    "recording_ranks",
    "shard_holders",
    "supersede",
    "superseded_rows",
    "whole_layer_rows",
]

#: ``rank`` of a row merged from the shards of all ranks.
MERGED_RANK = -1
#: Row kinds that describe parameters (and so may be sharded).
PARAM_KINDS = ("grad", "weight")
_GLOBAL_SCALARS = ("grad_norm", "grad_nonfinite")


class MissingRanksWarning(RuntimeWarning):
    """Some rank's data is missing: merged results cover only the complete steps."""


class SupersededRowsWarning(RuntimeWarning):
    """A rank was resumed: rows of an earlier attempt were replaced by a later one's."""


#: Schema metadata key of a merged table: how many rows of earlier attempts were left out.
SUPERSEDED_KEY = b"torchvitals.superseded"
_NO_CUT = np.iinfo(np.int64).max


@dataclass
class Superseded:
    """What :func:`supersede` left out, and the rows that an attempt wrote below its own
    start step (they may duplicate an earlier attempt's steps: mixed, not superseded)."""

    rows: int = 0
    #: ``{(rank, attempt): (rows, their steps, the step the later attempt starts at)}``
    by_attempt: dict[tuple[int, int], tuple[int, np.ndarray, int]] = field(default_factory=dict)
    #: ``{(rank, attempt): (its start step, steps it wrote below it)}``
    below_start: dict[tuple[int, int], tuple[int, np.ndarray]] = field(default_factory=dict)

    def describe(self) -> str:
        parts = [
            f"rank {r}: {n} row(s) of attempt {a} at step(s) {_ranges(steps.tolist())}, "
            f"superseded by a later attempt from step {start}"
            for (r, a), (n, steps, start) in sorted(self.by_attempt.items())[:8]
        ]
        more = len(self.by_attempt) - len(parts)
        return "; ".join(parts) + (f"; and {more} more" if more > 0 else "")


def _attempt_starts(manifest: Any) -> list[int | None]:
    """The start step of each attempt the manifest lists (None where unknown)."""
    attempts = manifest.get("attempts") if isinstance(manifest, dict) else None
    if not isinstance(attempts, list):
        return []  # written before schema version 3: one attempt
    starts = [e.get("start_step") if isinstance(e, dict) else None for e in attempts]
    return [s if isinstance(s, int) and not isinstance(s, bool) else None for s in starts]


def supersede(
    per_rank: Mapping[int, pa.Table], manifests: Mapping[int, dict]
) -> tuple[dict[int, pa.Table], Superseded]:
    """Each rank's rows without those an earlier attempt wrote at steps a later attempt
    of the rank restarted from (a job resumed from a checkpoint at step k writes steps
    k, k+1, ... again): so each ``(step, layer, kind)`` or ``(step, name)`` of a rank is
    the latest attempt's. Row by row, from the manifests alone: it works on any subset
    of the steps. Rows without an attempt (older runs) are the first attempt's."""
    kept: dict[int, pa.Table] = {}
    report = Superseded()
    for rank, table in per_rank.items():
        starts = _attempt_starts(manifests.get(rank))
        if len(starts) < 2 or not table.num_rows:
            kept[rank] = table
            continue
        # cut[a]: the first step a later attempt restarted from; the last slot is for
        # attempts the manifest does not list (never superseded)
        cut = np.full(len(starts) + 1, _NO_CUT, dtype=np.int64)
        for a in range(len(starts) - 2, -1, -1):
            later = starts[a + 1]
            cut[a] = cut[a + 1] if later is None else min(cut[a + 1], later)
        step = table.column("step").to_numpy()
        attempt = pc.fill_null(table.column("attempt"), 0).to_numpy().astype(np.int64)
        attempt = np.clip(attempt, 0, len(starts))
        drop = step >= cut[attempt]
        own = np.array([_NO_CUT if s is None else s for s in starts] + [_NO_CUT])
        below = (attempt > 0) & (attempt < len(starts)) & (step < own[attempt])
        for a in np.unique(attempt[below]).tolist():
            report.below_start[(rank, a)] = (starts[a], np.unique(step[below & (attempt == a)]))
        if not drop.any():
            kept[rank] = table
            continue
        for a in np.unique(attempt[drop]).tolist():
            rows = drop & (attempt == a)
            report.by_attempt[(rank, a)] = (int(rows.sum()), np.unique(step[rows]), int(cut[a]))
        report.rows += int(drop.sum())
        kept[rank] = table.filter(pa.array(~drop))
    return kept, report


def whole_layer_rows(table: pa.Table) -> pa.Table:
    """``table`` (``layers`` or ``hist`` as :func:`merge_ranks` returns it) without the
    rows of a shard left unmerged (``shards_complete`` 0: a rank's part of a sharded
    parameter whose other shards are missing). What is left describes whole tensors: use
    it wherever a row is read as a layer's statistic (norms, counts, histograms)."""
    if "shards_complete" not in table.column_names:  # a table from before schema version 3
        return table
    partial = pc.equal(pc.fill_null(table.column("shards_complete"), 1), 0)
    if not pc.any(partial).as_py():
        return table  # the common case: no copy
    return table.filter(pc.invert(partial))


def superseded_rows(table: pa.Table) -> int:
    """How many rows of earlier attempts :func:`merge_ranks` left out of ``table``."""
    return int((table.schema.metadata or {}).get(SUPERSEDED_KEY, b"0"))


class _MissingSteps(Mapping):
    """``{rank: steps it lacks}`` for every rank below the world size, without a list per
    missing rank (a world of a million ranks costs nothing): a rank with no data lacks
    every step."""

    def __init__(self, world: int, present: dict[int, list[int]], everything: np.ndarray):
        self._world = world
        self._present = present
        self._everything = everything

    def __getitem__(self, rank: int) -> list[int]:
        if rank in self._present:
            return self._present[rank]
        if isinstance(rank, int) and 0 <= rank < self._world:
            return self._everything.tolist()
        raise KeyError(rank)

    def __iter__(self):
        yield from sorted(set(self._present) | set(range(self._world)))

    def __len__(self) -> int:
        return len(set(self._present) | set(range(self._world)))

    def present_items(self) -> list[tuple[int, list[int]]]:
        return sorted(self._present.items())


@dataclass(frozen=True)
class RankCoverage:
    """Which ranks of a run wrote data, and which steps each one lacks."""

    world_size: int
    ranks: tuple[int, ...]  #: ranks with a manifest or data
    missing: tuple[int, ...]  #: ranks below ``world_size`` that wrote nothing
    unclosed: tuple[int, ...]  #: ranks whose manifest has no ``closed_at``
    #: per rank, the steps other ranks recorded and it did not (missing ranks: all)
    missing_steps: Mapping[int, list[int]] = field(default_factory=dict)

    @property
    def complete(self) -> bool:
        if self.missing:
            return False
        items = (
            self.missing_steps.present_items()
            if isinstance(self.missing_steps, _MissingSteps)
            else self.missing_steps.items()
        )
        return not any(steps for _r, steps in items)

    def describe(self) -> str:
        parts = []
        if len(self.missing) <= 8:
            parts += [f"rank {r} wrote nothing (no manifest, no data)" for r in self.missing]
        else:
            parts.append(
                f"{len(self.missing)} ranks wrote nothing (no manifest, no data): "
                f"{_ranges(list(self.missing))}"
            )
        items = (
            self.missing_steps.present_items()
            if isinstance(self.missing_steps, _MissingSteps)
            else sorted(self.missing_steps.items())
        )
        missing = set(self.missing)
        for r, steps in items:
            if r in missing or not steps:
                continue
            why = " and did not close cleanly (no closed_at)" if r in self.unclosed else ""
            parts.append(f"rank {r} has no data for step(s) {_ranges(steps)}{why}")
        return f"world_size={self.world_size}: " + "; ".join(parts)


def _ranges(steps: list[int], limit: int = 8) -> str:
    """``[3, 4, 5, 9]`` -> ``"3-5, 9"`` (at most ``limit`` ranges)."""
    out: list[str] = []
    start = prev = None
    for s in [*steps, None]:
        if s is not None and prev is not None and s == prev + 1:
            prev = s
            continue
        if start is not None:
            out.append(str(start) if start == prev else f"{start}-{prev}")
        if len(out) > limit:
            break
        start = prev = s
    text = ", ".join(out[:limit])
    return text + (f", ... ({len(steps)} steps)" if len(out) > limit else "")


def _world_size(manifests: Mapping[int, dict], ranks: set[int]) -> int:
    sizes = [m.get("world_size") for m in manifests.values()]
    sizes = [s for s in sizes if isinstance(s, int) and not isinstance(s, bool) and s > 0]
    return max([*sizes, max(ranks, default=0) + 1])


def _dist(manifest: dict) -> dict:
    dist = manifest.get("distributed")
    return dist if isinstance(dist, dict) else {}


def recording_ranks(mesh: np.ndarray, replicated: Sequence[bool]) -> list[int]:
    """Global ranks that record a DTensor on the device mesh ``mesh`` (an array of global
    ranks): those at coordinate 0 of every mesh dimension it is ``replicated`` along."""
    for dim, rep in enumerate(replicated[: mesh.ndim]):
        if rep:
            mesh = mesh.take([0], axis=dim)
    return sorted(int(r) for r in mesh.ravel().tolist())


def _mesh_key(entry: Any) -> tuple | None:
    """A hashable description of a ``distributed.meshes`` entry: ``(shape, first rank)``
    for a mesh of consecutive ranks, ``(shape, ranks)`` otherwise; None when malformed."""
    if not isinstance(entry, dict) or not isinstance(entry.get("shape"), list):
        return None
    shape = tuple(entry["shape"])
    if not all(_is_rank(n) for n in shape):
        return None
    if "first_rank" in entry:
        first = entry["first_rank"]
        return (shape, first) if _is_rank(first) else None
    try:  # written before schema version 3, or a mesh of other than consecutive ranks
        ranks = np.asarray(entry.get("ranks"), dtype=np.int64)
    except (TypeError, ValueError, OverflowError):
        return None
    if ranks.shape != shape or (ranks < 0).any():
        return None
    return (shape, tuple(ranks.ravel().tolist()))


def _mesh_array(key: tuple) -> np.ndarray:
    shape, ranks = key
    if isinstance(ranks, tuple):
        return np.array(ranks, dtype=np.int64).reshape(shape)
    return np.arange(ranks, ranks + int(np.prod(shape, dtype=np.int64))).reshape(shape)


def _is_rank(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def shard_holders(manifests: Mapping[int, dict]) -> dict[str, frozenset[int]]:
    """``{parameter name: ranks that record a shard of it}`` from the manifests.

    Schema version 3 stores per parameter only its mesh and placements (the manifest
    grows with the parameters, not with world size x parameters); the recording ranks
    are derived here, once per distinct (mesh, placements). Older manifests list them
    (``recorded_by``)."""
    keys: dict[str, set[tuple]] = {}
    ranks_of: dict[tuple, frozenset[int]] = {}
    for m in manifests.values():
        dist = _dist(m)
        sharded = dist.get("sharded")
        if not isinstance(sharded, dict):
            continue
        meshes = dist.get("meshes")
        meshes = [_mesh_key(e) for e in meshes] if isinstance(meshes, list) else []
        for name, entry in sharded.items():
            if not isinstance(entry, dict):
                continue
            listed = entry.get("recorded_by")
            mesh, placements = entry.get("mesh"), entry.get("placements")
            if isinstance(listed, list):
                key: tuple = ("recorded_by", *(r for r in listed if _is_rank(r)))
                if key not in ranks_of:
                    ranks_of[key] = frozenset(key[1:])
            elif _is_rank(mesh) and mesh < len(meshes) and meshes[mesh] is not None:
                replicated = tuple(
                    isinstance(p, str) and p.startswith("Replicate")
                    for p in (placements if isinstance(placements, list) else ())
                )
                key = (meshes[mesh], replicated)
                if key not in ranks_of:
                    ranks_of[key] = frozenset(
                        recording_ranks(_mesh_array(meshes[mesh]), replicated)
                    )
            else:
                continue
            keys.setdefault(name, set()).add(key)
    return {name: frozenset().union(*(ranks_of[k] for k in ks)) for name, ks in keys.items()}


def rank_coverage(per_rank: Mapping[int, pa.Table], manifests: Mapping[int, dict]) -> RankCoverage:
    """The ranks and steps present in ``per_rank`` (one table, e.g. ``run.per_rank
    ["scalars"]``, which every rank writes at every step) against the run's world size."""
    present = set(manifests) | {r for r, t in per_rank.items() if t.num_rows}
    world = _world_size(manifests, present)
    steps = {r: np.unique(t.column("step").to_numpy()) for r, t in per_rank.items()}
    everything = np.unique(np.concatenate([*steps.values(), np.zeros(0, np.int64)]))
    missing = np.setdiff1d(np.arange(world), np.array(sorted(present), dtype=np.int64))
    present_steps = {
        r: np.setdiff1d(everything, steps.get(r, np.zeros(0, np.int64))).tolist()
        for r in sorted(present)
    }
    unclosed = tuple(sorted(r for r, m in manifests.items() if "closed_at" not in m))
    return RankCoverage(
        world,
        tuple(sorted(present)),
        tuple(missing.tolist()),
        unclosed,
        _MissingSteps(world, present_steps, everything),
    )


def _sorted(parts: list[pa.Table]) -> pa.Table:
    t = pa.concat_tables(parts)
    if t.num_rows:
        t = t.sort_by([("step", "ascending"), ("rank", "ascending")])
    return t.unify_dictionaries().combine_chunks()


def concat_ranks(
    name: str, per_rank: Mapping[int, pa.Table], manifests: Mapping[int, dict] | None = None
) -> pa.Table:
    """All ranks' rows side by side, stable-sorted by ``(step, rank)``; nothing combined."""
    tables = [per_rank[r] for r in sorted(per_rank)]
    return _sorted(tables) if tables else empty_table(name)


def _labels(labels: list[str], codes: np.ndarray) -> pa.Array:
    return pa.DictionaryArray.from_arrays(
        pa.array(codes, pa.int32()), pa.array(labels, pa.string())
    )


def _groups(rank: np.ndarray, keys: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """``(order, starts)``: the rows sorted by ``keys`` (last most significant) then by
    ``rank``, and the sorted position where each group of equal ``keys`` starts."""
    order = np.lexsort([rank, *keys])
    boundary = np.zeros(len(order), dtype=bool)
    boundary[0] = True
    for k in keys:
        s = k[order]
        boundary[1:] |= s[1:] != s[:-1]
    return order, np.flatnonzero(boundary)


def _complete(
    starts: np.ndarray, s_rank: np.ndarray, member: np.ndarray, want: np.ndarray
) -> np.ndarray:
    """Per group (rows sorted by rank within it): exactly one row from each of the
    ``want`` expected ranks (``member``: the row's rank is one of them)."""
    sizes = np.diff(np.append(starts, len(s_rank)))
    repeat = np.zeros(len(s_rank), dtype=bool)
    repeat[1:] = s_rank[1:] == s_rank[:-1]
    repeat[starts] = False
    bad = np.add.reduceat((~member | repeat).astype(np.int64), starts)
    return (sizes == want) & (bad == 0)


def _group_reduce(
    column: pa.ChunkedArray, order: np.ndarray, starts: np.ndarray, ufunc: np.ufunc
) -> pa.Array:
    """``ufunc`` reduced over each group; null where any member is null."""
    arr = column.combine_chunks()
    values = pc.fill_null(arr, 0).to_numpy(zero_copy_only=False)[order]
    out = ufunc.reduceat(values, starts)
    nulls = np.add.reduceat(arr.is_null().to_numpy(zero_copy_only=False)[order], starts)
    return pa.array(out, type=arr.type, mask=nulls > 0)


def _merge_shards(name: str, table: pa.Table, manifests: Mapping[int, dict]) -> pa.Table:
    holders = shard_holders(manifests)
    if not holders or not table.num_rows:
        return table
    kind = table.column("kind").cast(pa.string())
    layer = table.column("layer").cast(pa.string())
    is_shard = pc.and_(
        pc.is_in(kind, value_set=pa.array(PARAM_KINDS)),
        pc.is_in(layer, value_set=pa.array(sorted(holders))),
    ).to_numpy(zero_copy_only=False)
    shard_pos = np.flatnonzero(is_shard)
    if not len(shard_pos):
        return table
    shards = table.take(shard_pos)
    step = shards.column("step").to_numpy()
    rank = shards.column("rank").to_numpy().astype(np.int64)
    layer_codes, layer_labels = dictionary_codes(shards.column("layer"))
    kind_codes, kind_labels = dictionary_codes(shards.column("kind"))
    order, starts = _groups(rank, [kind_codes, layer_codes, step])
    n = len(order)
    sizes = np.diff(np.append(starts, n))
    s_rank, s_layer = rank[order], layer_codes[order]
    expected = [holders.get(label, frozenset()) for label in layer_labels]
    # [layer code, rank present in the data]: sized by the data, never by a manifest
    seen = np.unique(rank)
    is_holder = np.zeros((len(expected), len(seen)), dtype=bool)
    for c, ranks in enumerate(expected):
        cols = np.searchsorted(seen, np.array(sorted(ranks), dtype=np.int64))
        ok = cols < len(seen)
        ok[ok] &= seen[cols[ok]] == np.array(sorted(ranks), dtype=np.int64)[ok]
        is_holder[c, cols[ok]] = True
    member = (s_rank >= 0) & is_holder[s_layer, np.searchsorted(seen, s_rank)]
    want = np.array([len(h) for h in expected])[s_layer[starts]]
    complete = _complete(starts, s_rank, member, want)

    lengths = None
    if name == "hist":
        lengths = pc.list_value_length(shards.column("counts")).to_numpy(zero_copy_only=False)
        if len(np.unique(lengths)) > 1:
            complete[:] = False  # histogram layouts differ: nothing can be added up

    kept = np.ones(table.num_rows, dtype=bool)
    group_of_row = np.repeat(np.arange(len(starts)), sizes)
    kept[shard_pos[order[complete[group_of_row]]]] = False
    rest = table.take(np.flatnonzero(kept))
    if not complete.all():  # the shards left unmerged are part of a parameter only
        i = rest.schema.get_field_index("shards_complete")
        partial = pa.array(is_shard[kept])
        flag = pc.if_else(partial, pa.scalar(0, pa.int8()), rest.column(i))
        rest = rest.set_column(i, rest.schema.field(i), flag)
    parts = [rest]

    if complete.any():
        first = np.minimum.reduceat(order, starts)
        g_step = step[order][starts]
        cols: dict[str, pa.Array] = {
            "step": pa.array(g_step, pa.int64()),
            "rank": pa.array(np.full(len(starts), MERGED_RANK), pa.int32()),
            "attempt": _group_reduce(shards.column("attempt"), order, starts, np.maximum),
            "layer": _labels(layer_labels, s_layer[starts]),
            "kind": _labels(kind_labels, kind_codes[order][starts]),
            "shards_complete": pa.array(np.ones(len(starts), dtype=np.int8)),
        }
        if name == "layers":
            for key in LAYER_STATS:
                ufunc = np.maximum if key == "max_abs" else np.add
                cols[key] = _group_reduce(shards.column(key), order, starts, ufunc)
        else:
            bins = int(lengths[0])
            offsets = pa.array(np.arange(len(starts) + 1) * bins, pa.int32())
            for key in ("counts", "neg_counts"):
                column = shards.column(key)
                if column.null_count:  # a run from before signed histograms
                    cols[key] = pa.nulls(len(starts), column.type)
                    continue
                flat = pc.list_flatten(column).to_numpy(zero_copy_only=False)
                summed = np.add.reduceat(flat.reshape(n, bins)[order], starts, axis=0)
                cols[key] = pa.ListArray.from_arrays(offsets, pa.array(summed.ravel()))
        merged = pa.Table.from_arrays(
            [cols[f.name] for f in SCHEMAS[name]], schema=SCHEMAS[name]
        ).filter(pa.array(complete))
        position = np.lexsort((first[complete], g_step[complete]))
        parts.insert(0, merged.take(position))  # in the order rank 0 wrote them

    if not complete.all():
        missing: set[int] = set()
        steps: set[int] = set()
        layers: set[str] = set()
        for g in np.flatnonzero(~complete):
            rows = slice(starts[g], starts[g] + sizes[g])
            missing |= expected[s_layer[starts[g]]] - set(s_rank[rows].tolist())
            steps.add(int(step[order][starts[g]]))
            layers.add(layer_labels[s_layer[starts[g]]])
        who = f"rank(s) {', '.join(map(str, sorted(missing)))}" if missing else "no rank"
        names = ", ".join(sorted(layers)[:8]) + (
            f", ... ({len(layers)})" if len(layers) > 8 else ""
        )
        warnings.warn(
            f"torchvitals: merging {name!r}: shards of {int((~complete).sum())} "
            f"parameter row(s) at step(s) {_ranges(sorted(steps))} are incomplete "
            f"(missing {who}) for {names}; those rows are kept per rank, unmerged, with "
            "shards_complete = 0: each describes part of its parameter, never the whole "
            "(whole_layer_rows leaves them out)",
            MissingRanksWarning,
            stacklevel=4,
        )
    return _sorted(parts)


def _global_grad_scalars(table: pa.Table, manifests: Mapping[int, dict]) -> pa.Table:
    holders = shard_holders(manifests)
    if not holders or not all(_dist(m).get("grads_on") == "rank0" for m in manifests.values()):
        return table
    expected = frozenset().union(*holders.values()) | {0}
    names = table.column("name").cast(pa.string())
    sel = table.filter(pc.is_in(names, value_set=pa.array(_GLOBAL_SCALARS)))
    if not sel.num_rows:
        return table
    step = sel.column("step").to_numpy()
    rank = sel.column("rank").to_numpy().astype(np.int64)
    codes, labels = dictionary_codes(sel.column("name"))
    value = sel.column("value").to_numpy(zero_copy_only=False)
    order, starts = _groups(rank, [codes, step])
    s_rank = rank[order]
    member = np.isin(s_rank, np.array(sorted(expected)))
    complete = _complete(starts, s_rank, member, np.full(len(starts), len(expected)))
    if not complete.any():
        return table
    g_codes = codes[order][starts]
    squares = np.add.reduceat(value[order] ** 2, starts)
    sums = np.add.reduceat(value[order], starts)
    is_norm = np.array([labels[c] == "grad_norm" for c in g_codes], dtype=bool)
    merged = pa.table(
        {
            "step": pa.array(step[order][starts], pa.int64()),
            "rank": pa.array(np.full(len(starts), MERGED_RANK), pa.int32()),
            "attempt": _group_reduce(sel.column("attempt"), order, starts, np.maximum),
            "name": _labels(labels, g_codes),
            "value": pa.array(np.where(is_norm, norm(squares), sums)),
        },
        schema=SCHEMAS["scalars"],
    ).filter(pa.array(complete))
    return _sorted([merged, table])


def merge_ranks(
    name: str, per_rank: Mapping[int, pa.Table], manifests: Mapping[int, dict]
) -> pa.Table:
    """The exact merge (see the module docstring); a ``torchvitals.store.reader.MergeFn``.

    First each rank's rows of earlier attempts are superseded (:func:`supersede`): the
    table says how many in its schema metadata (:func:`superseded_rows`), and the merge
    of ``scalars`` (written at every step) warns with a :class:`SupersededRowsWarning`.
    Tables are stable-sorted by ``(step, rank)``, so a step's merged rows (rank -1)
    come first, then each rank's rows in the order it wrote them.
    """
    per_rank, superseded = supersede(per_rank, manifests)
    if superseded.rows and name == "scalars":
        warnings.warn(
            f"torchvitals: resumed run: each step has the latest attempt's rows only: "
            f"{superseded.describe()} (in 'scalars'; the rows of 'layers' and 'hist' at "
            "those steps are superseded too)",
            SupersededRowsWarning,
            stacklevel=2,
        )
    if superseded.below_start:
        (rank, attempt), (start, steps) = min(superseded.below_start.items())
        warnings.warn(
            f"torchvitals: merging {name!r}: attempt {attempt} of rank {rank} starts at step "
            f"{start} but has rows at step(s) {_ranges(steps.tolist())}: they are kept "
            "beside the earlier attempts' rows of those steps (a writer resumed without "
            "start_step that wrote earlier steps again?)",
            SupersededRowsWarning,
            stacklevel=2,
        )
    table = _merge(name, per_rank, manifests)
    if superseded.rows:
        meta = {**(table.schema.metadata or {}), SUPERSEDED_KEY: str(superseded.rows).encode()}
        table = table.replace_schema_metadata(meta)
    return table


def _merge(name: str, per_rank: Mapping[int, pa.Table], manifests: Mapping[int, dict]) -> pa.Table:
    table = concat_ranks(name, per_rank)
    if name == "scalars":
        coverage = rank_coverage(per_rank, manifests)
        if not coverage.complete:
            warnings.warn(
                f"torchvitals: missing rank data: {coverage.describe()}; merged rows "
                "(rank -1) exist only for steps every rank recorded",
                MissingRanksWarning,
                stacklevel=3,
            )
        return _global_grad_scalars(table, manifests)
    if name in ("layers", "hist"):
        return _merge_shards(name, table, manifests)
    return table
