"""A training loop's writes and the warnings torchvitals gives, for the writer's tests in
store/ and reliability/ (on the import path, like training_runs.py)."""

from __future__ import annotations


def train(w, steps: int = 200) -> int:
    """A training loop: submits must keep returning, whatever the disk does."""
    for i in range(steps):
        w.submit("scalars", {"step": i, "name": "loss", "value": float(i)})
        if i % 50 == 49:
            w.flush()
    return steps


def torchvitals_warnings(rec) -> list[str]:
    return [str(r.message) for r in rec if "torchvitals" in str(r.message)]
