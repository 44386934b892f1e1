"""One event per phenomenon on synthetic curves: a kick-in that pauses and goes on, a
divergence caused by an LR rise, and onsets of gradual changes (fresh noise each seed)."""

from __future__ import annotations

import numpy as np
import pytest

from torchvitals.analysis.detect import detect_events


def kinds(events, kind):
    return [e for e in events if e.kind == kind]


def staircase(n, k, pause, rng, noise=0.02):
    """ln(10) until ``k``, a fall to x0.85, a pause of ``pause`` steps, a fall to x0.7."""
    t = np.arange(n, dtype=np.float64)
    d = 0.04 * n  # each fall takes d steps
    first = np.clip((t - k) / d, 0, 1)
    second = np.clip((t - k - d - pause) / d, 0, 1)
    loss = 2.3 * np.exp(np.log(0.85) * first + np.log(0.7 / 0.85) * second)
    return loss * np.exp(noise * rng.standard_normal(n))


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("n", [600, 5000])
def test_kick_in_with_a_short_pause_is_one_kick_in(seed, n):
    rng = np.random.default_rng(seed)
    k = int(0.5 * n)
    ev = detect_events(loss=staircase(n, k, pause=int(0.04 * n), rng=rng))
    ki = kinds(ev, "kick_in")
    assert len(ki) == 1, ev
    assert abs(ki[0].step - k) <= 0.05 * n
    # its end and size take in the continuation: larger than either stage alone (x0.85)
    assert ki[0].end_step >= k + 0.1 * n
    assert ki[0].evidence["ratio"] < 0.85
    assert ki[0].evidence["stages"] == 2
    assert len(kinds(ev, "plateau")) == 1, ev


@pytest.mark.parametrize("seed", [0, 1])
def test_kick_ins_separated_by_a_plateau_stay_two(seed):
    rng = np.random.default_rng(seed)
    n, k = 2000, 600
    ev = detect_events(loss=staircase(n, k, pause=int(0.3 * n), rng=rng))
    ki = kinds(ev, "kick_in")
    assert len(ki) == 2, ev
    assert abs(ki[0].step - k) <= 0.05 * n
    assert abs(ki[1].step - (k + 0.04 * n + 0.3 * n)) <= 0.05 * n
    assert "stages" not in ki[0].evidence
    # each after its own plateau
    assert len(kinds(ev, "plateau")) == 2, ev
