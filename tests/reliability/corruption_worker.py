"""Worker of the corruption sweep (run by harness.run_cases; not a test module).

usage: python corruption_worker.py CASES.json TEMPLATE_DIR

Each case copies the template run, damages the copy (``flip``: one byte XORed;
``truncate``: the file cut; ``hostile``: a scenario of hostile.py), loads it and
classifies what load_run did:

- ``error``: raised a ValueError/OSError whose message names the damaged file;
- ``intact``: every row and the manifest as written (warnings allowed);
- ``recovered``: rows missing, and a warning names the damaged file or counts the loss;
- ``flagged``: every row intact, the manifest changed and a warning says so;
- ``bad``: anything else: an error not naming the file, another exception, a row that
  was never written, rows lost without a warning, a manifest changed without a warning.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from harness import worker_loop
from hostile import SCENARIOS
from runs import load, rows


def intact(template: str):
    run, msgs = load(template)
    assert not isinstance(run, Exception) and not msgs, (run, msgs)
    return dict(run.tables), {t: rows(run.table(t)) for t in run.tables}, run.manifests


def classify(path: str, named: str, original) -> dict:
    want_tables, want_rows, want_manifests = original
    run, msgs = load(path)
    if isinstance(run, (ValueError, OSError)):
        text = str(run)
        if named in text:
            return {"outcome": "error", "detail": f"{type(run).__name__}: {text[:160]}"}
        return {
            "outcome": "bad",
            "why": "unclear_error",
            "detail": f"{type(run).__name__}: {text[:300]}",
        }
    if isinstance(run, Exception):
        return {
            "outcome": "bad",
            "why": "traceback",
            "detail": f"{type(run).__name__}: {run}"[:300],
        }
    lost = 0
    for table, want in want_rows.items():
        try:
            got_table = run.table(table)
            got_table.validate(full=True)
            if got_table.equals(want_tables[table]):
                continue
            got = rows(got_table)
        except Exception as exc:  # an invalid table
            return {"outcome": "bad", "why": "invalid_table", "detail": f"{table}: {exc}"[:300]}
        extra = got - want
        if extra:
            return {
                "outcome": "bad",
                "why": "wrong_values",
                "detail": f"{table}: {list(extra)[:2]}"[:300],
            }
        lost += sum((want - got).values())
    named_in = [m for m in msgs if named in m]
    if run.manifests != want_manifests:
        if not any("manifest" in m for m in named_in):
            return {"outcome": "bad", "why": "silent_manifest_change", "detail": str(msgs)[:300]}
        if not lost:
            return {"outcome": "flagged", "warned": len(msgs)}
    if lost:
        counted = [m for m in msgs if "row(s) the manifest says were written are missing" in m]
        if not named_in and not counted:
            return {"outcome": "bad", "why": "silent_loss", "detail": f"{lost} rows; {msgs}"[:300]}
        return {"outcome": "recovered", "rows_lost": lost, "warned": len(msgs)}
    return {"outcome": "intact", "warned": len(msgs)}


def main() -> None:
    cases_file, template = sys.argv[1], sys.argv[2]
    original = intact(template)
    base = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
    scratch = tempfile.mkdtemp(prefix="tv-corrupt-", dir=base)
    work = os.path.join(scratch, "run")  # one copy, damaged and restored file by file
    shutil.copytree(template, work, symlinks=True)

    def handle(case: dict) -> dict:
        if case["op"] == "hostile":
            path = os.path.join(scratch, "hostile")
            shutil.copytree(template, path, symlinks=True)
            try:
                return classify(path, SCENARIOS[case["scenario"]](Path(path)), original)
            finally:
                shutil.rmtree(path, ignore_errors=True)
        target = Path(work) / case["file"]
        data = (Path(template) / case["file"]).read_bytes()
        if case["op"] == "flip":
            damaged = bytearray(data)
            damaged[case["offset"]] ^= case["xor"]
        else:
            damaged = data[: case["length"]]
        target.write_bytes(bytes(damaged))
        try:
            return classify(work, case["file"], original)
        finally:
            target.write_bytes(data)

    try:
        worker_loop(cases_file, handle)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
