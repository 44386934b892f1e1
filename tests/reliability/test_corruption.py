"""Byte flips, truncations and hostile files against load_run, each in a child process
with a timeout: no crash, no hang, a clear message naming the file, and what is
returned is exactly what was written (a damaged batch is left out and reported)."""

from __future__ import annotations

import json
import os
import random
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pytest
from harness import run_cases
from hostile import SCENARIOS
from runs import write_template

HERE = Path(__file__).resolve().parent
WORKER = HERE / "corruption_worker.py"
SEGMENTS = ("scalars.rank0.000000.arrows", "layers.rank0.000000.arrows", "hist.rank0.000000.arrows")
HEADER_OF = "hist.rank0.000000.arrows"  # every byte up to the end of its first record batch
SAMPLES = 200  # single-byte flips of random value elsewhere, over every segment
SUMMARY = os.environ.get("TORCHVITALS_RELIABILITY_SUMMARY")  # where to write the counts


@pytest.fixture(scope="module")
def template(tmp_path_factory):
    path = tmp_path_factory.mktemp("template") / "run"
    write_template(str(path))
    return path


def message_ends(data: bytes) -> list[int]:
    """Byte offsets where each message of an intact stream ends."""
    reader = pa.BufferReader(pa.py_buffer(data))
    ends = []
    while True:
        try:
            message = pa.ipc.read_message(reader)
        except EOFError:
            break
        ends.append(reader.tell())
        if message.type == "record batch" and len(ends) > 64:
            break
    return ends


def first_batch_end(data: bytes) -> int:
    reader = pa.BufferReader(pa.py_buffer(data))
    while pa.ipc.read_message(reader).type != "record batch":
        pass
    return reader.tell()


def build_cases(template: Path) -> list[dict]:
    rng = random.Random(20240516)
    cases = []
    manifest = (template / "manifest.rank0.json").read_bytes()
    for i in range(len(manifest)):
        case = {"op": "flip", "file": "manifest.rank0.json", "offset": i, "xor": 0x01}
        cases.append({"id": f"manifest-{i}", **case})
    header = first_batch_end((template / HEADER_OF).read_bytes())
    for i in range(header):
        cases.append(
            {"id": f"header-{i}", "op": "flip", "file": HEADER_OF, "offset": i, "xor": 0x01}
        )
    sizes = {name: (template / name).stat().st_size for name in SEGMENTS}
    for k in range(SAMPLES):
        name = rng.choice(SEGMENTS)
        offset, xor = rng.randrange(sizes[name]), rng.randrange(1, 256)
        cases.append(
            {"id": f"sample-{k}", "op": "flip", "file": name, "offset": offset, "xor": xor}
        )
    for name in SEGMENTS:
        data = (template / name).read_bytes()
        cuts = {0, 1, 7, 8, len(data) - 1}
        for end in message_ends(data):
            cuts |= {end - 1, end, end + 4}
        cuts |= {rng.randrange(len(data)) for _ in range(20)}
        for cut in sorted(c for c in cuts if 0 <= c < len(data)):
            cases.append(
                {"id": f"truncate-{name}-{cut}", "op": "truncate", "file": name, "length": cut}
            )
    for scenario in SCENARIOS:
        cases.append({"id": f"hostile-{scenario}", "op": "hostile", "scenario": scenario})
    return cases


@pytest.fixture(scope="module")
def compacted(tmp_path_factory):
    path = tmp_path_factory.mktemp("compacted") / "run"
    write_template(str(path), compact=True)
    return path


PARQUET = tuple(name.replace(".arrows", ".parquet") for name in SEGMENTS)
FOOTER_OF = "layers.rank0.000000.parquet"  # every byte of its footer and its last pages


def build_parquet_cases(template: Path) -> list[dict]:
    rng = random.Random(20261128)
    cases = []
    data = (template / FOOTER_OF).read_bytes()
    footer = int.from_bytes(data[-8:-4], "little") + 8
    for i in range(max(0, len(data) - footer - 256), len(data)):
        cases.append(
            {"id": f"pqfooter-{i}", "op": "flip", "file": FOOTER_OF, "offset": i, "xor": 1}
        )
    sizes = {name: (template / name).stat().st_size for name in PARQUET}
    for k in range(SAMPLES):
        name = rng.choice(PARQUET)
        offset, xor = rng.randrange(sizes[name]), rng.randrange(1, 256)
        cases.append(
            {"id": f"pqsample-{k}", "op": "flip", "file": name, "offset": offset, "xor": xor}
        )
    for name in PARQUET:
        size = sizes[name]
        cuts = {0, 1, 4, 8, size - 8, size - 1} | {rng.randrange(size) for _ in range(20)}
        for cut in sorted(c for c in cuts if 0 <= c < size):
            cases.append(
                {"id": f"pqtruncate-{name}-{cut}", "op": "truncate", "file": name, "length": cut}
            )
    return cases


def check(cases: list[dict], results: dict[str, dict], summary_key: str) -> dict:
    assert len(results) == len(cases)
    by_kind: dict[str, Counter] = {}
    failures = []
    for case in cases:
        result = results[case["id"]]
        kind = case["id"].split("-")[0]
        by_kind.setdefault(kind, Counter())[result["outcome"]] += 1
        if result["outcome"] in ("bad", "crash", "hang"):
            failures.append((case, result))
    summary = {kind: dict(counts) for kind, counts in by_kind.items()}
    print(json.dumps(summary, indent=1, sort_keys=True))
    if SUMMARY:
        where = Path(SUMMARY)
        old = json.loads(where.read_text()) if where.exists() else {}
        old[summary_key] = summary
        where.write_text(json.dumps(old, indent=1, sort_keys=True) + "\n")
    assert not failures, failures[:10]
    return summary


def test_compacted_corruptions_never_crash_hang_or_lie(compacted):
    """The same sweep over the Parquet files a closed run is compacted into: page CRCs,
    the footer's row count and the types catch the damage; the intact row groups stay."""
    assert sorted(p.name for p in compacted.glob("*.parquet")) == sorted(PARQUET)
    cases = build_parquet_cases(compacted)
    results = run_cases(WORKER, cases, args=(str(compacted),), timeout=30.0)
    summary = check(cases, results, "parquet")
    assert summary["pqsample"].get("recovered", 0) + summary["pqsample"].get("error", 0) > 0


def test_corruptions_never_crash_hang_or_lie(template):
    cases = build_cases(template)
    results = run_cases(WORKER, cases, args=(str(template),), timeout=30.0)
    check(cases, results, "stream")
    # the hostile cases each end in a clear error or a load of intact data
    hostile = {c["scenario"]: results[c["id"]]["outcome"] for c in cases if c["op"] == "hostile"}
    assert set(hostile.values()) <= {"error", "intact", "recovered", "flagged"}, hostile
