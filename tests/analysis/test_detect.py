"""Tests for torchvitals.analysis.detect_events on synthetic and real curves."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from torchvitals.analysis.detect import detect_events
from torchvitals.analysis.events import Event
from torchvitals.engine.contract import COUNT_KEYS, MOMENT_KEYS

CURVES = Path(__file__).resolve().parents[3] / "shared" / "curves"


def kinds(events, kind):
    return [e for e in events if e.kind == kind]


def base_curve(n, rng, noise=0.03, floor=0.5):
    t = np.arange(n)
    clean = floor + 2.0 * np.exp(-t / (0.1 * n))
    return clean * np.exp(noise * rng.standard_normal(n))


# ----------------------------------------------------------------- plateau then kick-in
@pytest.mark.parametrize("n,noise", [(200, 0.005), (20_000, 0.05)])
def test_plateau_then_kick_in(n, noise):
    rng = np.random.default_rng(1)
    t = np.arange(n)
    k = int(0.4 * n)
    loss = np.where(t < k, 2.3, 2.3 * np.exp(-3.0 * np.minimum(t - k, 0.05 * n) / (0.05 * n)))
    loss = loss * np.exp(noise * rng.standard_normal(n))
    ev = detect_events(loss=loss, step=t)
    ki = kinds(ev, "kick_in")
    assert len(ki) == 1, ev
    assert abs(ki[0].step - k) <= 0.05 * n
    pl = kinds(ev, "plateau")
    assert pl and pl[0].step <= 0.1 * n and pl[0].end_step >= k - 0.05 * n
    assert not kinds(ev, "lr_drop") and not kinds(ev, "spike")


# -------------------------------------------------------------------------- LR drops
@pytest.mark.parametrize("n,noise", [(200, 0.01), (50_000, 0.08)])
def test_lr_step_drop(n, noise):
    rng = np.random.default_rng(2)
    loss = base_curve(n, rng, noise)
    t = np.arange(n)
    d = int(0.6 * n)
    loss[d:] *= 0.5
    lr = np.where(t < d, 0.1, 0.01)
    ev = detect_events(loss=loss, step=t, lr=lr)
    ld = kinds(ev, "lr_drop")
    assert len(ld) == 1, ev
    assert abs(ld[0].step - d) <= max(2, 0.01 * n)
    assert ld[0].evidence["lr_ratio"] == pytest.approx(0.1)
    assert ld[0].evidence["ratio"] == pytest.approx(0.5, rel=0.15)
    assert not kinds(ev, "kick_in")
    # the same drop without an LR series is a kick-in
    ev2 = detect_events(loss=loss, step=t)
    assert len(kinds(ev2, "kick_in")) == 1 and not kinds(ev2, "lr_drop")


def test_lr_change_without_effect_is_an_lr_drop_with_no_measurable_effect():
    rng = np.random.default_rng(3)
    n = 300
    loss = base_curve(n, rng, 0.01)
    lr = np.where(np.arange(n) < 150, 0.1, 0.01)
    ev = detect_events(loss=loss, lr=lr)
    assert not kinds(ev, "kick_in")
    (ld,) = kinds(ev, "lr_drop")
    assert ld.step == 150 and ld.evidence["confidence"] == "none"
    assert ld.evidence["lr_ratio"] == pytest.approx(0.1)
    assert "no measurable effect" in ld.cause


def test_lr_rise_is_an_event():
    rng = np.random.default_rng(5)
    n = 300
    loss = base_curve(n, rng, 0.01)
    lr = np.where(np.arange(n) < 100, 0.01, 0.05)
    (lr_rise,) = kinds(detect_events(loss=loss, lr=lr), "lr_rise")
    assert lr_rise.step == 100 and lr_rise.evidence["lr_ratio"] == pytest.approx(5.0)


@pytest.mark.parametrize("n", [300, 30_000])
def test_cosine_and_linear_decay_are_not_lr_drops(n):
    rng = np.random.default_rng(4)
    t = np.arange(n)
    lr_cos = 0.5 * (1 + np.cos(np.pi * t / n))
    # the loss tracks the schedule: faster decrease as the LR anneals
    loss = (0.8 + 2.0 * np.exp(-t / (0.1 * n))) * (0.85 + 0.15 * lr_cos)
    loss *= np.exp(0.01 * rng.standard_normal(n))
    ev = detect_events(loss=loss, step=t, lr=lr_cos)
    assert not kinds(ev, "lr_drop"), ev
    assert not kinds(ev, "spike") and not kinds(ev, "divergence")
    lr_lin = np.minimum(1.0, (n - t) / (0.3 * n))
    ev = detect_events(loss=loss, step=t, lr=lr_lin)
    assert not kinds(ev, "lr_drop"), ev


# ---------------------------------------------------------------- divergence / spikes
@pytest.mark.parametrize("n,noise", [(200, 0.01), (100_000, 0.05)])
def test_divergence(n, noise):
    rng = np.random.default_rng(5)
    loss = base_curve(n, rng, noise)
    d = int(0.7 * n)
    loss[d:] = loss[d:] * np.exp(np.linspace(0, 3, n - d))
    ev = detect_events(loss=loss)
    dv = kinds(ev, "divergence")
    assert len(dv) == 1, ev
    assert d - 0.02 * n <= dv[0].step <= d + 0.15 * n
    assert dv[0].severity == "critical"


@pytest.mark.parametrize("n,noise", [(300, 0.01), (200_000, 0.05)])
def test_spike_vs_single_outlier(n, noise):
    rng = np.random.default_rng(6)
    loss = base_curve(n, rng, noise)
    s = int(0.5 * n)
    dur = max(4, n // 1000)
    loss[s : s + dur] *= np.exp(np.linspace(1.5, 0.3, dur))
    o = int(0.3 * n)
    loss[o] *= 1.8  # a single bad batch
    ev = detect_events(loss=loss)
    sp = kinds(ev, "spike")
    assert len(sp) == 1, ev
    assert abs(sp[0].step - s) <= 1
    assert sp[0].evidence["recovery_steps"] <= 3 * dur
    assert not kinds(ev, "divergence")
    assert all(abs(e.step - o) > 0 for e in sp)
    assert any(e.kind == "outlier" and e.step == o and e.severity == "info" for e in ev)


def test_nan_loss_and_first_layer():
    rng = np.random.default_rng(7)
    n = 100
    loss = base_curve(n, rng, 0.01)
    loss[70:] = np.nan
    nf_a = np.zeros(n)
    nf_b = np.zeros(n)
    nf_b[68:] = 3
    nf_a[69:] = 1
    ev = detect_events(loss=loss, **{"nonfinite/a": nf_a, "nonfinite/b": nf_b})
    nf = kinds(ev, "nonfinite")
    assert len(nf) == 1
    assert nf[0].step == 68 and nf[0].layers[0][0] == "b"
    assert "loss at step 70" in nf[0].cause


# ------------------------------------------------------------------------ accuracy
def test_accuracy_higher_is_better():
    rng = np.random.default_rng(8)
    n = 120
    t = np.arange(n)
    acc = 0.7 - 0.5 * np.exp(-t / 8.0) + 0.003 * rng.standard_normal(n)
    acc[60:] += 0.08
    lr = np.where(t < 60, 0.1, 0.01)
    ev = detect_events(loss=acc, lr=lr, higher_is_better=True)
    ld = kinds(ev, "lr_drop")
    assert len(ld) == 1 and abs(ld[0].step - 60) <= 1
    acc_pct = acc * 100
    ev = detect_events(loss=acc_pct, lr=lr, higher_is_better=True)
    assert len(kinds(ev, "lr_drop")) == 1


def test_negative_losses():
    rng = np.random.default_rng(9)
    n = 400
    t = np.arange(n)
    loss = -2 - 3 * (1 - np.exp(-t / 40)) + 0.02 * rng.standard_normal(n)
    loss[250:] -= 1.0
    ev = detect_events(loss=loss)
    assert len(kinds(ev, "kick_in")) == 1
    assert not kinds(ev, "spike") and not kinds(ev, "divergence")


# -------------------------------------------------------------------- layer findings
def test_layer_findings():
    rng = np.random.default_rng(10)
    n = 500
    loss = base_curve(n, rng, 0.01)
    t = np.arange(n)
    series = {
        "dead_frac/fc1": np.clip(t / n, 0, 1) * 0.8,
        "dead_frac/fc2": np.full(n, 0.05),
        "sat_frac/tanh": np.full(n, 0.7),
        "grad_norm/emb": np.full(n, 1e-6),
        "grad_norm/fc1": np.ones(n),
        "grad_norm/fc2": np.ones(n) * 2,
        "grad_norm/fc3": np.exp(np.linspace(0, 7, n)),
        "weight_norm/fc1": np.linspace(1, 30, n),
        "weight_norm/fc2": np.ones(n),
    }
    ev = detect_events(loss=loss, num_classes=10, **series)
    got = {(e.kind, e.layer) for e in ev}
    assert ("dead_units", "fc1") in got and ("dead_units", "fc2") not in got
    assert ("saturation", "tanh") in got
    assert ("vanishing_gradient", "emb") in got
    assert ("exploding_gradient", "fc3") in got
    assert ("weight_norm_growth", "fc1") in got and ("weight_norm_growth", "fc2") not in got
    assert not kinds(ev, "initial_loss")  # 2.5 vs ln(10) = 2.3
    ev = detect_events(loss=loss * 20, num_classes=10)
    il = kinds(ev, "initial_loss")
    assert len(il) == 1 and il[0].evidence["expected"] == pytest.approx(math.log(10))


# ------------------------------------------------------------------------ fake run
def fake_run(n=200, layers=("l1", "l2"), drop=120):
    pa = pytest.importorskip("pyarrow")
    rng = np.random.default_rng(11)
    loss = base_curve(n, rng, 0.01)
    loss[drop:] *= 0.5
    lr = np.where(np.arange(n) < drop, 0.1, 0.01)
    steps, names, vals = [], [], []
    for s in range(n):
        for name, v in (("loss", loss[s]), ("lr/group0", lr[s]), ("grad_norm", 1.0)):
            steps.append(s)
            names.append(name)
            vals.append(float(v))
    scalars = pa.table(
        {
            "step": pa.array(steps, pa.int64()),
            "rank": pa.array(np.zeros(len(steps), np.int32)),
            "name": pa.array(names).dictionary_encode(),
            "value": pa.array(vals, pa.float64()),
        }
    )
    rows = {k: [] for k in ("step", "layer", "kind", *COUNT_KEYS, *MOMENT_KEYS)}
    for s in range(n):
        for _li, layer in enumerate(layers):
            for kind in ("grad", "act", "weight"):
                dead = int(50 * s / n) if (layer == "l2" and kind == "act") else 0
                g = 4.0 if (layer == "l1" and kind == "grad" and s >= drop - 5) else 1.0
                vals_ = dict(
                    step=s,
                    layer=layer,
                    kind=kind,
                    numel=1000,
                    nan=0,
                    inf=0,
                    zeros=0,
                    saturated=300 if (kind == "act" and layer == "l1") else 0,
                    units=64,
                    dead_units=dead,
                    saturated_units=0,
                    sum=0.0,
                    sumsq=g**2,
                    max_abs=1.0,
                )
                for k, v in vals_.items():
                    rows[k].append(v)
    tbl = {k: pa.array(v) for k, v in rows.items()}
    tbl["layer"] = pa.array(rows["layer"]).dictionary_encode()
    tbl["kind"] = pa.array(rows["kind"]).dictionary_encode()
    tbl["rank"] = pa.array(np.zeros(len(rows["step"]), np.int32))

    class Run:
        pass

    run = Run()
    run.scalars = scalars
    run.layers = pa.table(tbl)
    return run


def test_fake_run_path():
    run = fake_run()
    ev = detect_events(run)
    ld = kinds(ev, "lr_drop")
    assert len(ld) == 1 and abs(ld[0].step - 120) <= 1
    # attribution: l1's gradient norm surged 5 steps before, then the LR change
    # anchored at the LR change: the LR comes first (lead 0); the attribution looks for
    # layer changes after it, so l1's gradient surge 5 steps before is not its response
    assert ld[0].layers[0][:2] == ("*", "lr") and ld[0].layers[0][3] == 0
    assert any(m == "lr" for _, m, _, _ in ld[0].layers)
    assert ("saturation", "l1") in {(e.kind, e.layer) for e in ev}
    dead = [e for e in ev if e.kind == "dead_units"]
    assert [e.layer for e in dead] == ["l2"]  # dead_units/units grows 0 -> 49/64
    assert dead[0].evidence["end_frac"] == pytest.approx(0.73, abs=0.05)
    json.dumps([e.to_dict() for e in ev])


def test_event_to_dict_roundtrip():
    e = Event(
        "spike",
        3,
        5,
        "warning",
        "x",
        {"a": np.float64(1.0), "b": float("nan")},
        [("l", "grad_norm", np.float64(0.5), 2)],
    )
    d = json.loads(json.dumps(e.to_dict()))
    assert d["evidence"] == {"a": 1.0, "b": None}
    assert d["layers"][0] == {"layer": "l", "metric": "grad_norm", "change": 0.5, "lead_steps": 2}
    with pytest.raises(ValueError):
        Event("spike", 1, 1, "bad")


# ---------------------------------------------------------------------- bad input
def test_bad_input():
    with pytest.raises(ValueError, match="loss"):
        detect_events()
    with pytest.raises(ValueError, match="loss"):
        detect_events(loss=[])
    with pytest.raises(ValueError, match="step"):
        detect_events(loss=np.ones(10), step=np.arange(9))
    with pytest.raises(ValueError, match="lr"):
        detect_events(loss=np.ones(10), lr=np.ones(11))
    with pytest.raises(ValueError, match="grad_norm/fc1"):
        detect_events(loss=np.ones(10), **{"grad_norm/fc1": np.ones(3)})
    with pytest.raises(ValueError, match="bogus"):
        detect_events(loss=np.ones(10), bogus=np.ones(10))
    with pytest.raises(ValueError, match="loss"):
        detect_events(loss=np.ones((3, 3)))
    assert detect_events(loss=[1.0]) == []
    assert detect_events(loss=np.full(50, 2.0)) == []


def test_unsorted_steps_are_sorted():
    rng = np.random.default_rng(12)
    n = 200
    loss = base_curve(n, rng, 0.01)
    loss[120:] *= 0.5
    perm = rng.permutation(n)
    ev = detect_events(loss=loss[perm], step=np.arange(n)[perm])
    assert len(kinds(ev, "kick_in")) == 1


# ---------------------------------------------------------------------- long runs
def test_long_noisy_run_without_events():
    """100k steps x 20 layers of plain noisy decay: nothing to report on the curve (the time
    for 1M x 200 is measured by ``benchmarks/eval_curves.py --perf``, not in a test)."""
    rng = np.random.default_rng(13)
    n = 100_000
    loss = base_curve(n, rng, 0.05)
    series = {f"grad_norm/l{k}": np.abs(1 + 0.1 * rng.standard_normal(n)) for k in range(20)}
    ev = detect_events(loss=loss, lr=np.full(n, 0.1), grad_norm=np.ones(n), **series)
    curve = [e for e in ev if e.kind in ("spike", "divergence", "lr_drop", "nonfinite")]
    assert not curve, curve


# ---------------------------------------------------------------------- real curves
def _csv(name):
    if not CURVES.is_dir():
        pytest.skip("../shared/curves not available")
    import csv

    with open(CURVES / name) as f:
        return list(csv.DictReader(f))


def _col(rows, name):
    return np.array([float(r[name]) if r[name] != "" else np.nan for r in rows])


def test_real_wrn_lr_drops():
    rows = _csv("wrn_cifar10_wide-resnet.csv")
    ev = detect_events(loss=_col(rows, "train_loss"), step=_col(rows, "epoch"), lr=_col(rows, "lr"))
    steps = sorted(e.step for e in kinds(ev, "lr_drop"))
    assert any(abs(s - 60) <= 1 for s in steps) and any(abs(s - 120) <= 1 for s in steps)
    assert not kinds(ev, "spike") and not kinds(ev, "divergence")
    assert any(e.step <= 45 and e.end_step >= 55 for e in kinds(ev, "plateau"))


def test_real_nanogpt_outliers_not_spikes():
    rows = _csv("modded_nanogpt_2024-10-10_Muon_steps.csv")
    loss = _col(rows, "train_loss")
    ok = np.isfinite(loss)
    ev = detect_events(
        loss=loss[ok], step=_col(rows, "step")[ok], lr=_col(rows, "lr_multiplier_from_schedule")[ok]
    )
    assert not kinds(ev, "spike") and not kinds(ev, "divergence")
    assert not kinds(ev, "lr_drop") and not kinds(ev, "kick_in")
    outl = {e.step for e in kinds(ev, "outlier")}
    assert {919, 947, 1760, 3361, 5335, 6127} <= outl


def test_real_grok_kick_in_and_spikes():
    rows = _csv("grok_nanda_modadd113.csv")
    ep = _col(rows, "epoch")
    ev = detect_events(loss=_col(rows, "test_acc"), step=ep, higher_is_better=True)
    ki = kinds(ev, "kick_in")
    assert ki and 3500 <= ki[0].step <= 6000
    ev = detect_events(loss=_col(rows, "train_loss"), step=ep)
    sp = sorted(e.step for e in kinds(ev, "spike"))
    for s in (14200, 15900, 37100, 37900):
        assert any(abs(x - s) <= 200 for x in sp), sp
    assert not kinds(ev, "divergence")


def test_real_bloom_spike_attribution():
    rows = [
        r
        for r in _csv("bigscience_chronicles_log_lines.csv")
        if "tr11-176B-ml/chronicles.md" in r["source_file"]
        and 31214 <= int(r["iteration"]) <= 31251
    ]
    ev = detect_events(
        loss=_col(rows, "lm_loss"), step=_col(rows, "iteration"), grad_norm=_col(rows, "grad_norm")
    )
    sp = kinds(ev, "spike")
    assert sp and 31214 <= sp[0].step <= 31222
    _layer, metric, change, lead = sp[0].layers[0]
    assert metric == "grad_norm" and change > 0 and lead >= 1
