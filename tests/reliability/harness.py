"""Run risky cases in child processes, so that a segfault or a hang is a result, not a
dead test run.

A worker (a Python script) gets a JSON file of cases and prints, for each one,
``start ID`` before it and ``done ID JSON`` after it, flushing each line. The parent
reads those lines with a deadline per case: a worker that dies mid-case is a *crash* of
that case, one that does not finish it in time a *hang* (it is killed); either way a new
worker carries on with the next case.
"""

from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path


def _env() -> dict[str, str]:
    """The children import the torchvitals this process imported: the source tree in a
    checkout with a built extension, the installed package otherwise (as in CI)."""
    import torchvitals

    env = dict(os.environ)
    package_parent = str(Path(torchvitals.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_parent, env.get("PYTHONPATH", "")) if p)
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def _run_batch(
    script: Path, args: list[str], cases: list[dict], timeout: float, start_timeout: float
) -> dict[str, dict]:
    results: dict[str, dict] = {}
    todo = list(cases)
    while todo:
        with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
            json.dump(todo, f)
            case_file = f.name
        proc = subprocess.Popen(
            [sys.executable, str(script), case_file, *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=_env(),
        )
        lines: queue.Queue[str | None] = queue.Queue()

        def pump(stream=proc.stdout, out=lines):
            for line in stream:
                out.put(line)
            out.put(None)

        errs: list[str] = []

        def drain(stream=proc.stderr, out=errs):
            out.extend(stream)

        threading.Thread(target=pump, daemon=True).start()
        threading.Thread(target=drain, daemon=True).start()
        current: str | None = None
        deadline = time.monotonic() + start_timeout
        finished = False
        while True:
            try:
                line = lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                proc.kill()
                proc.wait()
                if current is not None:
                    results[current] = {"outcome": "hang", "detail": f"over {timeout} s"}
                break
            if line is None:  # the worker exited
                proc.wait()
                if current is not None:
                    tail = "".join(errs[-5:])[-500:]
                    results[current] = {
                        "outcome": "crash",
                        "detail": f"worker died (returncode {proc.returncode}): {tail}",
                    }
                else:
                    finished = True
                break
            kind, _, rest = line.rstrip("\n").partition(" ")
            if kind == "start":
                current = rest
                deadline = time.monotonic() + timeout
            elif kind == "done":
                case_id, _, payload = rest.partition(" ")
                results[case_id] = json.loads(payload)
                current = None
                deadline = time.monotonic() + timeout
        os.unlink(case_file)
        todo = [c for c in todo if c["id"] not in results]
        if finished and todo:  # the worker ended without doing them all
            for c in todo:
                results[c["id"]] = {
                    "outcome": "crash",
                    "detail": "never run: " + "".join(errs)[-500:],
                }
            todo = []
    return results


def run_cases(
    script: Path,
    cases: list[dict],
    *,
    args: tuple[str, ...] = (),
    timeout: float = 20.0,
    start_timeout: float = 120.0,
    workers: int = 2,
) -> dict[str, dict]:
    """``{case id: result}`` for every case, run by ``workers`` child processes."""
    shares = [cases[i::workers] for i in range(workers)]
    out: dict[str, dict] = {}
    threads = []
    for share in shares:
        if not share:
            continue

        def work(share=share):
            out.update(_run_batch(script, list(args), share, timeout, start_timeout))

        t = threading.Thread(target=work)
        t.start()
        threads.append(t)
    for t in threads:
        t.join()
    return out


def worker_loop(cases_file: str, handle) -> None:
    """The worker side: ``handle(case) -> dict`` for each case, with the line protocol."""
    with open(cases_file) as f:
        cases = json.load(f)
    for case in cases:
        print(f"start {case['id']}", flush=True)
        result = handle(case)
        print(f"done {case['id']} {json.dumps(result)}", flush=True)
