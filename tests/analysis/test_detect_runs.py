"""detect_events on small real training runs with known interventions.

Each run (``tests/training_runs.py``) trains a small model on CPU with the Monitor attached
and one known intervention: an LR step, an LR raised far too high, corrupted batches, a
NaN in the input, a tiny initialisation (plateau, then kick-in), dead ReLU units and
over-scaled logits. The tests read the run back with ``load_run`` and check that the
detector reports the intervention, of the right kind, near the right step, and nothing
that contradicts it. Runs are deterministic (seeded data, initialisation and batch order,
one thread) and each takes a few seconds.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import training_runs as tr

from torchvitals.analysis import detect_events


def kinds(events, kind):
    return [e for e in events if e.kind == kind]


def near(events, kind, step, tol):
    return [e for e in events if e.kind == kind and abs(e.step - step) <= tol]


def attributed(event, layer, metric):
    """The (change, lead_steps) the attribution gives ``layer``/``metric``, else None."""
    for a, b, change, lead in event.layers:
        if (a, b) == (layer, metric):
            return change, lead
    return None


# ------------------------------------------------------------------------ 1. LR step
@pytest.fixture(scope="module")
def lr_step(tmp_path_factory):
    return tr.record(tmp_path_factory, tr.lr_step, "lr_step")


def test_lr_step_is_an_lr_drop(lr_step):
    r = lr_step
    n, at = tr.LR_STEP_RUN, tr.LR_STEP_AT
    assert r.loss.size == n and np.isfinite(r.loss).all()
    # the run really shows the effect: the loss floor falls once the LR is cut
    before, after = np.median(r.loss[at - 100 : at]), np.median(r.loss[at + 20 : at + 120])
    assert after < 0.7 * before, (before, after)
    assert r.lr[at - 1] == pytest.approx(0.2) and r.lr[at] == pytest.approx(0.02)

    drops = kinds(r.events, "lr_drop")
    assert len(drops) == 1, r
    ev = drops[0]
    assert abs(ev.step - at) <= 0.03 * n, r
    assert ev.end_step >= ev.step
    assert ev.evidence["lr_change_step"] == at
    assert ev.evidence["lr_ratio"] == pytest.approx(0.1)
    assert ev.evidence["ratio"] < 0.7
    # the LR change is attributed, and it comes first (the loss cannot move before it)
    lr_change = attributed(ev, "*", "lr")
    assert lr_change is not None, ev.layers
    assert lr_change[0] == pytest.approx(math.log(0.1)) and lr_change[1] >= 0
    # no kick-in (nor anything else) explains the same drop
    assert not near(r.events, "kick_in", at, 0.1 * n), r
    assert not kinds(r.events, "spike") and not kinds(r.events, "divergence"), r
    assert not kinds(r.events, "nonfinite"), r


def test_lr_step_attribution_names_the_lr_other_seed(tmp_path_factory):
    r = tr.record(tmp_path_factory, tr.lr_step, "lr_step_seed4", seed=4)
    drops = kinds(r.events, "lr_drop")
    assert len(drops) == 1 and abs(drops[0].step - tr.LR_STEP_AT) <= 0.03 * tr.LR_STEP_RUN, r
    ev = drops[0]
    assert ev.evidence["loss_onset_step"] >= tr.LR_STEP_AT - 3, ev.evidence
    assert attributed(ev, "*", "lr") is not None, ev.layers


# -------------------------------------------------------------------- 2. LR too high
@pytest.fixture(scope="module")
def lr_too_high(tmp_path_factory):
    return tr.record(tmp_path_factory, tr.lr_too_high, "lr_too_high")


def test_lr_too_high_is_a_divergence(lr_too_high):
    r = lr_too_high
    n, at = tr.DIVERGE_RUN, tr.DIVERGE_AT
    assert np.isfinite(r.loss).all()
    best = np.median(r.loss[at - 50 : at])
    assert np.median(r.loss[-100:]) > 3 * best  # it rose for good
    assert r.lr[at] == pytest.approx(100 * r.lr[at - 1])

    div = kinds(r.events, "divergence")
    assert len(div) == 1, r
    ev = div[0]
    assert at <= ev.step <= at + 0.05 * n, r
    assert ev.end_step == n - 1 and ev.severity == "critical"
    # the LR increase is attributed, before or at the onset
    lr_change = attributed(ev, "*", "lr")
    assert lr_change is not None, ev.layers
    assert lr_change[0] == pytest.approx(math.log(100)) and lr_change[1] >= 0
    assert "LR increased" in ev.cause
    # nothing claims the loss improved after the shock
    assert not [e for e in r.events if e.kind in ("kick_in", "lr_drop") and e.step >= at], r


def test_lr_raised_30x_is_a_divergence(tmp_path_factory):
    r = tr.record(tmp_path_factory, tr.lr_too_high, "lr_30x", factor=30.0)
    at = tr.DIVERGE_AT
    assert np.median(r.loss[-100:]) > 1.5 * np.median(r.loss[at - 50 : at])
    assert [e for e in kinds(r.events, "divergence") if e.step >= at], r


# ---------------------------------------------------------------- 3. corrupted batches
@pytest.fixture(scope="module")
def corrupted(tmp_path_factory):
    return tr.record(tmp_path_factory, tr.corrupted_batches, "corrupted")


def test_corrupted_batches_are_a_spike(corrupted):
    r = corrupted
    at, length = tr.CORRUPT_AT, tr.CORRUPT_LEN
    base = np.median(r.loss[at - 50 : at])
    assert (r.loss[at : at + length] > 4 * base).all()  # shuffled labels: the loss jumps
    assert np.median(r.loss[at + length : at + length + 50]) < 1.5 * base  # ... and recovers

    spikes = kinds(r.events, "spike")
    assert len(spikes) == 1, r
    ev = spikes[0]
    assert abs(ev.step - at) <= 1, r
    assert at + length - 2 <= ev.end_step <= at + 4 * length, r
    assert ev.evidence["ratio"] > 4
    assert ev.evidence["recovery_steps"] <= 4 * length
    # the gradient norm surged with the loss (garbage labels, large gradients)
    surge = attributed(ev, "*", "grad_norm")
    assert surge is not None and surge[0] > 0 and abs(surge[1]) <= 2, ev.layers
    assert not kinds(r.events, "divergence"), r


def test_single_corrupted_batch_is_at_most_an_outlier(corrupted):
    r = corrupted
    one = tr.CORRUPT_ONE_AT
    assert r.loss[one] > 4 * np.median(r.loss[one - 50 : one])
    assert not near(r.events, "spike", one, 5), r
    out = near(r.events, "outlier", one, 0)
    assert len(out) == 1 and out[0].severity == "info", r
    # outliers are never attributed, and no other curve event sits on the bad batch
    assert not [e for e in r.events if e.kind != "outlier" and abs(e.step - one) <= 5], r


def test_inputs_x100_recovery_is_real(tmp_path_factory):
    r = tr.record(tmp_path_factory, tr.corrupted_batches, "x100", how="scale", one=False)
    at = tr.CORRUPT_AT
    base = np.median(r.loss[at - 50 : at])
    for ev in kinds(r.events, "spike"):
        after = np.median(r.loss[ev.end_step + 1 : ev.end_step + 11])
        assert after < 3 * base, (str(ev), after, base)
    if np.median(r.loss[-10:]) > 10 * base:
        assert [e for e in kinds(r.events, "divergence") if e.step >= at], r


# ----------------------------------------------------------------------------- 4. NaN
@pytest.fixture(scope="module")
def nan_run(tmp_path_factory):
    return tr.record(tmp_path_factory, tr.nan_input, "nan")


def test_nan_input_is_nonfinite_at_its_step_in_the_first_layer(nan_run):
    r = nan_run
    at = tr.NAN_AT
    assert np.isfinite(r.loss[:at]).all() and np.isnan(r.loss[at:]).all()
    nf = kinds(r.events, "nonfinite")
    assert len(nf) == 1, r
    ev = nf[0]
    assert ev.step == at and ev.severity == "critical"
    assert ev.evidence["first_step"] == at and ev.evidence["first_layer_step"] == at
    # the first layer, in forward order, where NaN appeared (stem, act, head)
    assert f"layer stem at step {at}" in ev.cause, ev.cause
    assert f"loss at step {at}" in ev.cause, ev.cause
    named = {a for a, *_ in ev.layers}
    assert {"stem", "act", "head"} <= named
    assert all(lead == 0 for *_, lead in ev.layers)
    # the NaN tail is not mistaken for a jump of the finite curve
    assert not [e for e in r.events if e.kind in ("spike", "divergence", "outlier")], r


def test_nan_input_first_attributed_layer_is_the_first_in_forward_order(nan_run):
    ev = kinds(nan_run.events, "nonfinite")[0]
    assert ev.layers[0][0] == "stem", ev.layers


def test_nan_input_reports_no_dead_units(nan_run):
    assert not kinds(nan_run.events, "dead_units"), nan_run


# ------------------------------------------------------------- 5. plateau then kick-in
@pytest.fixture(scope="module")
def kick(tmp_path_factory):
    return tr.record(tmp_path_factory, tr.plateau_kick_in, "kick")


def first_below(loss, level, window=10):
    """First step where the mean of the next ``window`` losses is below ``level``."""
    mean = np.convolve(loss, np.ones(window) / window, mode="valid")
    return int(np.flatnonzero(mean < level)[0])


def test_plateau_then_kick_in(kick):
    r = kick
    n = tr.KICK_RUN
    assert np.median(r.loss[:100]) == pytest.approx(math.log(tr.CLASSES), rel=0.02)
    assert np.median(r.loss[-50:]) < 0.7 * math.log(tr.CLASSES)
    onset = first_below(r.loss, 0.98 * np.median(r.loss[:100]))  # where the loss leaves ln(10)
    assert 0.3 * n < onset < 0.8 * n

    plateaus, kicks = kinds(r.events, "plateau"), kinds(r.events, "kick_in")
    assert len(plateaus) == 1 and kicks, r
    pl, ki = plateaus[0], kicks[0]
    assert pl.step <= 0.05 * n and pl.end_step < ki.step, r
    assert ki.step - pl.end_step <= 0.03 * n
    assert abs(ki.step - onset) <= 0.03 * n, (onset, r)
    assert pl.evidence["followed_by_step"] == ki.step
    assert not kinds(r.events, "lr_drop"), r  # no LR logged changes
    assert not kinds(r.events, "spike") and not kinds(r.events, "divergence"), r


def test_sharp_kick_in_after_flat_plateau(tmp_path_factory):
    r = tr.record(
        tmp_path_factory, tr.plateau_kick_in, "kick_sharp", scale=0.2, lr=0.2, orthogonal=False
    )
    onset = first_below(r.loss, 0.98 * np.median(r.loss[:60]))
    assert np.median(r.loss[onset + 30 : onset + 40]) < 0.8 * np.median(r.loss[:60])
    ki = near(r.events, "kick_in", onset, 0.03 * tr.KICK_RUN)
    assert ki, (onset, r)
    assert [p for p in kinds(r.events, "plateau") if p.end_step < ki[0].step], r


# ------------------------------------------------------- 6. dead units, initial loss
@pytest.fixture(scope="module")
def dead(tmp_path_factory):
    return tr.record(tmp_path_factory, tr.dead_units_hot_logits, "dead", num_classes=tr.CLASSES)


def test_dead_relu_units_are_found_in_their_layer(dead):
    r = dead
    frac = tr.DEAD_UNITS / 64
    assert np.nanmin(r.series[f"dead_frac/{tr.HOSTILE}"]) >= frac
    found = {e.layer: e for e in kinds(r.events, "dead_units")}
    assert tr.HOSTILE in found, r  # the ReLU whose input bias is -100 on 48 of 64 units
    ev = found[tr.HOSTILE]
    assert ev.evidence["end_frac"] == pytest.approx(frac, abs=0.02)
    assert ev.step <= 0.05 * tr.DEAD_RUN  # dead from the start
    assert "head" not in found  # the logits layer keeps its units


def test_initial_loss_far_from_ln_classes(dead, tmp_path_factory):
    r = dead
    first = float(r.loss[0])
    assert first > 3 * math.log(tr.CLASSES)  # logits x50
    il = kinds(r.events, "initial_loss")
    assert len(il) == 1 and il[0].step == 0, r
    assert il[0].evidence["first_loss"] == pytest.approx(first)
    assert il[0].evidence["expected"] == pytest.approx(math.log(tr.CLASSES))
    assert il[0].severity == "critical"
    # without num_classes there is nothing to compare with
    assert not kinds(detect_events(r.run), "initial_loss")


def test_initial_loss_not_reported_for_a_normal_init(corrupted):
    assert corrupted.loss[0] == pytest.approx(math.log(tr.CLASSES), rel=0.1)
    assert not kinds(detect_events(corrupted.run, num_classes=tr.CLASSES), "initial_loss")
