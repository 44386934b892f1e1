"""Manifest size and parse time of a sharded run: schema version 3 against version 2.

A run of ``--world`` ranks, each holding a shard of each of ``--params`` DTensor
parameters (FSDP2 on a 1-d mesh of every rank). Version 2 listed in every rank's manifest,
per parameter, every rank that records it (``recorded_by``) and each mesh as the nested
list of its ranks: world x parameters numbers per manifest, world^2 x parameters per
run. Version 3 stores per parameter its mesh index and placements, and a mesh of
consecutive ranks as its shape and first rank; the merge derives the recording ranks.

Measured per format, interleaved: the bytes of one manifest; ``check_manifest`` (JSON
parse and validation, what ``load_run`` does with each manifest); and
``merge.shard_holders`` over the whole run's manifests (version 2: over ``--holders-ranks``
manifests, scaled to the world, since the whole would take minutes).

    python benchmarks/bench_manifest.py      # writes benchmarks/results/manifest-cpu.json
"""

from __future__ import annotations

import argparse
import gc
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import timing

from torchvitals.store.layout import manifest_bytes
from torchvitals.store.manifest_check import check_manifest
from torchvitals.store.merge import shard_holders
from torchvitals.store.schema import SCHEMA_VERSION


def manifest(rank: int, world: int, params: int, version: int) -> dict:
    """The manifest of ``rank``, as the Monitor writes it (the keys that grow with the
    model or the world), in schema ``version`` 2 or 3."""
    mesh = {"shape": [world], "dim_names": ["dp"], "coordinate": [rank]}
    if version == 2:
        mesh["ranks"] = list(range(world))
    else:
        mesh["first_rank"] = 0
    sharded = {}
    layers = []
    for i in range(params // 2):
        names = {f"blocks.{i}.weight": [1024, 1024], f"blocks.{i}.bias": [1024]}
        layers.append(
            {
                "name": f"blocks.{i}",
                "type": "Linear",
                "param_shapes": names,
                "hooked": ["act", "grad", "weight"],
                "measures": "output",
                "saturation": None,
            }
        )
        for name, shape in names.items():
            entry = {
                "mesh": 0,
                "placements": ["Shard(dim=0)"],
                "local_shape": [shape[0] // world + 1, *shape[1:]],
            }
            if version == 2:
                entry["recorded_by"] = list(range(world))
            sharded[name] = entry
    return {
        "schema_version": min(version, SCHEMA_VERSION),
        "rank": rank,
        "world_size": world,
        "distributed": {
            "rank": rank,
            "world_size": world,
            "grads_on": "rank0",
            "meshes": [mesh],
            "sharded": sharded,
        },
        "layers": layers,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--world", type=int, default=1000)
    parser.add_argument("--params", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--holders-ranks", type=int, default=10)
    args = parser.parse_args()

    texts = {v: manifest_bytes(manifest(0, args.world, args.params, v)) for v in (2, 3)}
    parsed = {v: check_manifest(texts[v], f"v{v}", 0)[0] for v in (2, 3)}
    holders_ranks = {2: min(args.holders_ranks, args.world), 3: args.world}
    # one parsed manifest stands for every rank's: the merge reads each the same way
    runs = {v: {r: parsed[v] for r in range(holders_ranks[v])} for v in (2, 3)}
    holders = {v: shard_holders(runs[v]) for v in (2, 3)}
    assert holders[2] == holders[3], "the two formats give different recording ranks"

    # The inputs stay alive for the whole run: out of the garbage collector's sight, so
    # that one variant's millions of objects do not slow the other's collections.
    gc.collect()
    gc.freeze()
    parse = timing.interleaved(
        {f"v{v}": (lambda v=v: check_manifest(texts[v], "m", 0)) for v in (2, 3)},
        repeats=args.repeats,
        warmup=1,
    )
    merge = timing.interleaved(
        {f"v{v}": (lambda v=v: shard_holders(runs[v])) for v in (2, 3)},
        repeats=args.repeats,
        warmup=1,
    )
    rows = []
    for v in (2, 3):
        scale = args.world / holders_ranks[v]
        rows.append(
            {
                "schema": v,
                "manifest MiB": f"{len(texts[v]) / 2**20:.3f}",
                "parse s": f"{timing.median(parse[f'v{v}']):.4f}",
                "parse, all ranks s": f"{timing.median(parse[f'v{v}']) * args.world:.1f}",
                "shard_holders, all ranks s": f"{timing.median(merge[f'v{v}']) * scale:.2f}"
                + (" (scaled)" if scale != 1 else ""),
            }
        )
    columns = list(rows[0])
    print(f"world {args.world} ranks x {args.params} sharded parameters")
    print(timing.table(rows, columns))
    path = timing.save(
        "manifest-cpu",
        {
            "args": vars(args),
            "environment": timing.environment("cpu"),
            "results": rows,
            "manifest_bytes": {f"v{v}": len(texts[v]) for v in (2, 3)},
            "parse_samples_s": parse,
            "shard_holders_samples_s": merge,
            "shard_holders_ranks": {f"v{v}": holders_ranks[v] for v in (2, 3)},
            "size_ratio": len(texts[2]) / len(texts[3]),
            "parse_ratio": timing.median(parse["v2"]) / timing.median(parse["v3"]),
        },
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
