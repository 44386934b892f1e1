"""Tests for the ranked layer attribution of curve events."""

from __future__ import annotations

import numpy as np
import pytest

from torchvitals.analysis.attribution import attribute
from torchvitals.analysis.detect import detect_events
from torchvitals.analysis.events import Event


def curve(n, rng, noise=0.01):
    t = np.arange(n)
    return (0.5 + 2.0 * np.exp(-t / (0.1 * n))) * np.exp(noise * rng.standard_normal(n))


def noisy(n, rng, level=1.0, rel=0.02):
    return level * np.exp(rel * rng.standard_normal(n))


def test_kick_in_ranked_by_lead_time():
    """Saturation falls in 'enc' 8 steps before a kick-in, dead units revive in 'dec' 3
    steps before; an unrelated layer does nothing."""
    rng = np.random.default_rng(0)
    n = 400
    t = np.arange(n)
    k = 200
    loss = np.where(t < k, 2.3, 0.3) * np.exp(0.01 * rng.standard_normal(n))
    sat = np.where(t < k - 8, 0.6, 0.1) + 0.005 * rng.standard_normal(n)
    dead = np.where(t < k - 3, 0.5, 0.1) + 0.005 * rng.standard_normal(n)
    ev = detect_events(
        loss=loss,
        **{
            "sat_frac/enc": sat,
            "dead_frac/dec": dead,
            "grad_norm/other": noisy(n, rng),
        },
    )
    ki = [e for e in ev if e.kind == "kick_in"]
    assert len(ki) == 1
    top = ki[0].layers
    assert [(a, b) for a, b, _, _ in top[:2]] == [("enc", "sat_frac"), ("dec", "dead_frac")]
    assert top[0][2] == pytest.approx(-0.5, abs=0.05) and top[0][3] == 8
    assert top[1][3] == 3
    assert "other" not in {a for a, _, _, _ in top}
    assert "saturation falling" in ki[0].cause and "dead units reviving" in ki[0].cause


def test_spike_grad_surge_and_loss_scale_collapse():
    rng = np.random.default_rng(1)
    n = 1000
    loss = curve(n, rng)
    s = 600
    loss[s : s + 6] *= np.array([3.0, 2.5, 2.0, 1.6, 1.3, 1.1])
    g = noisy(n, rng)
    g[s - 2 : s + 4] *= 50
    scale = np.full(n, 65536.0)
    scale[s:] = 8192.0
    ev = detect_events(
        loss=loss, grad_norm=noisy(n, rng), loss_scale=scale, **{"grad_norm/attn.3": g}
    )
    sp = [e for e in ev if e.kind == "spike"]
    assert len(sp) == 1 and sp[0].step == s
    first = sp[0].layers[0]
    assert first[:2] == ("attn.3", "grad_norm") and first[3] == 2
    assert first[2] == pytest.approx(np.log(50), abs=0.3)
    ls = [x for x in sp[0].layers if x[1] == "loss_scale"]
    assert ls and ls[0][2] == pytest.approx(np.log(8192 / 65536)) and ls[0][3] == 0
    assert "gradient-norm surge" in sp[0].cause and "loss-scale collapse" in sp[0].cause


def test_lr_drop_attributes_lr_change():
    rng = np.random.default_rng(2)
    n = 300
    t = np.arange(n)
    loss = curve(n, rng)
    loss[150:] *= 0.4
    lr = np.where(t < 150, 0.1, 0.02)
    ev = detect_events(loss=loss, lr=lr, **{"grad_norm/fc": noisy(n, rng)})
    ld = [e for e in ev if e.kind == "lr_drop"]
    assert len(ld) == 1
    assert ld[0].layers[0][1] == "lr" and ld[0].layers[0][2] == pytest.approx(np.log(0.2))
    assert "LR decreased x0.2" in ld[0].cause


def test_attribute_ignores_other_kinds_and_empty_inputs():
    step = np.arange(10)
    e = Event("plateau", 2, 5)
    attribute([e], step, lr=np.ones(10))
    assert e.layers == []
    e2 = Event("spike", 5, 6, "warning")
    attribute([e2], step)  # no candidates: nothing to do
    assert e2.layers == []
