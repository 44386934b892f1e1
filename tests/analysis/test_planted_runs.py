"""Fast subset of the planted-intervention suite (benchmarks/planted.py runs all cases on
three seeds): one seed, the small runs (each a second or two of training)."""

from __future__ import annotations

import warnings

import planted_cases as pc
import pytest
import training_runs as tr

from torchvitals import detect_events, load_run
from torchvitals.analysis.runtables import series_from_run

FAST = (
    "dying_relu",
    "nan_forward",
    "nan_backward",
    "nan_backward_grads_only",
    "corrupt_batch",
    "lr_schedule",
    "adam_too_high",
    "healthy_cosine",
    "tanh_release",
    "divergence_gradual",
    "kick_in_gradual",
)


@pytest.mark.parametrize("name", FAST)
def test_planted_case_passes(name, tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        path, truth = pc.PLANTED[name](tmp_path / "run", seed=0)
    run = load_run(path)
    _, loss, _, _ = series_from_run(run)
    events = detect_events(run)
    sc = pc.score(events, truth, loss)
    assert not sc["failures"], "\n".join(sc["failures"] + [str(e) for e in events])


def test_nan_origin_confidence(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        full, _ = tr.planted_nan(tmp_path / "a", "backward", act_grads=True)
        grads, _ = tr.planted_nan(tmp_path / "b", "backward", act_grads=False)
    (a,) = [e for e in detect_events(load_run(full)) if e.kind == "nonfinite"]
    (b,) = [e for e in detect_events(load_run(grads)) if e.kind == "nonfinite"]
    assert a.evidence["made_in"] == "backward" and a.evidence["confidence"] == "high"
    assert a.evidence["origin_layer"] == "boom"
    # only parameter gradients: the last one with NaN (fc1), the range named, low confidence
    assert b.evidence["origin_layer"] == "fc1" and b.evidence["confidence"] == "low"
    assert "boom" in b.cause
