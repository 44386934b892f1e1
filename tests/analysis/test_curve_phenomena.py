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


def gradual_fall(n, k, length, rng, noise):
    """Flat at 1.5 until ``k``, then a smooth (cosine-shaped) fall x0.2 over ``length``
    steps, with multiplicative minibatch-like noise."""
    t = np.arange(n, dtype=np.float64)
    u = np.clip((t - k) / length, 0, 1)
    loss = 1.5 * np.exp(np.log(0.2) * 0.5 * (1 - np.cos(np.pi * u)))
    return loss * np.exp(noise * rng.standard_normal(n))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_gradual_kick_in_on_a_noisy_curve(seed):
    """25% noise per step, a fall over 200 steps: too slow and too noisy to beat the trend
    within one window, found at four windows; onset where a tenth of the fall is done."""
    rng = np.random.default_rng(seed)
    n, k, length = 800, 250 + 20 * seed, 200
    ev = detect_events(loss=gradual_fall(n, k, length, rng, noise=0.25))
    ki = kinds(ev, "kick_in")
    assert len(ki) == 1, ev
    tenth = k + length * np.arccos(1 - 0.2) / np.pi  # the cosine fall is 10% done here
    assert abs(ki[0].step - tenth) <= 50, (ki[0].step, tenth)
    assert ki[0].evidence["ratio"] < 0.6
    assert not kinds(ev, "spike") and not kinds(ev, "divergence")


@pytest.mark.parametrize("seed", [0, 1])
def test_smooth_decline_is_no_kick_in(seed):
    """A noisy loss decaying smoothly (no plateau before it), and a slow decline of a few
    percent late in a long run: ordinary training, no event at either scale."""
    rng = np.random.default_rng(seed)
    n = 4000
    t = np.arange(n, dtype=np.float64)
    loss = (0.5 + 2.0 * np.exp(-t / 600)) * np.exp(0.1 * rng.standard_normal(n))
    loss[3000:] *= np.exp(-0.03 * (t[3000:] - 3000) / 1000)
    ev = detect_events(loss=loss)
    assert not kinds(ev, "kick_in") and not kinds(ev, "divergence"), ev


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_lr_rise_that_diverges_is_one_row(seed):
    rng = np.random.default_rng(seed)
    n, at = 600, 300
    t = np.arange(n)
    loss = 0.7 * np.exp(0.05 * rng.standard_normal(n))
    loss[at + 2 :] *= 6.0
    lr = np.where(t < at, 1e-3, 1e-1)
    ev = detect_events(loss=loss, lr=lr)
    (div,) = kinds(ev, "divergence")
    assert abs(div.step - at) <= 3
    assert not kinds(ev, "lr_rise"), ev
    assert div.evidence["lr_ratio"] == pytest.approx(100.0)
    assert div.evidence["lr_change_step"] == at
    assert "LR rose x100" in div.cause


def test_lr_rise_without_damage_stays_an_lr_rise():
    rng = np.random.default_rng(3)
    n, at = 600, 300
    t = np.arange(n)
    loss = (0.5 + np.exp(-t / 100)) * np.exp(0.02 * rng.standard_normal(n))
    lr = np.where(t < at, 1e-3, 2e-3)
    ev = detect_events(loss=loss, lr=lr)
    assert len(kinds(ev, "lr_rise")) == 1 and not kinds(ev, "divergence"), ev


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_gradual_divergence_on_a_noisy_curve(seed):
    """A slow x3 rise over 100 steps under 20% per-step noise (six point-to-point sigmas
    of this noise are more than the rise; six standard errors of two medians are not)."""
    rng = np.random.default_rng(seed)
    n, at = 500, 250
    t = np.arange(n, dtype=np.float64)
    loss = 0.7 * np.exp(np.log(3.0) * np.clip((t - at) / 100, 0, 1))
    loss *= np.exp(0.2 * rng.standard_normal(n))
    ev = detect_events(loss=loss)
    (div,) = kinds(ev, "divergence")
    assert abs(div.step - at) <= 50, div
