"""``torchvitals.analysis.compare`` on synthetic runs whose divergence step and differing
layer are known, on fresh random noise; and on runs written to disk and read back."""

from __future__ import annotations

import numpy as np
import pytest

from torchvitals.analysis import Event
from torchvitals.analysis.compare import (
    RunData,
    align_events,
    compare,
    first_divergence,
    noise,
    running_median,
)

STEPS = 600
LAYERS = ("fc1", "fc2", "fc3")


def synthetic(
    rng: np.random.Generator,
    name: str,
    *,
    loss_jump_at: int | None = None,
    grad_jump: tuple[str, int] | None = None,
    dead_jump: tuple[str, int] | None = None,
    spike_at: int | None = None,
    steps: int = STEPS,
) -> RunData:
    """A decaying loss with 5% multiplicative noise, three layers' gradient norms (20%
    noise) and dead fractions; optionally the loss x1.5 from ``loss_jump_at`` on, a layer's
    gradient norm x10 from a step on, a layer's dead fraction +0.4, a 3-step loss spike."""
    step = np.arange(steps)
    loss = (2.0 * np.exp(-step / 200) + 0.2) * np.exp(rng.normal(0, 0.05, steps))
    if loss_jump_at is not None:
        loss[step >= loss_jump_at] *= 1.5
    if spike_at is not None:
        loss[spike_at : spike_at + 3] *= 10
    series = {}
    for i, layer in enumerate(LAYERS):
        g = 10.0 ** (-i) * np.exp(-step / 400) * np.exp(rng.normal(0, 0.2, steps))
        if grad_jump and grad_jump[0] == layer:
            g[step >= grad_jump[1]] *= 10
        series[f"grad_norm/{layer}"] = g
        d = np.clip(0.1 + rng.normal(0, 0.01, steps), 0, 1)
        if dead_jump and dead_jump[0] == layer:
            d[step >= dead_jump[1]] += 0.4
        series[f"dead_frac/{layer}"] = d
    return RunData(name, step, loss, series)


def test_running_median_and_noise_against_definitions():
    rng = np.random.default_rng()
    x = rng.normal(size=101)
    med = running_median(x, 7)
    padded = np.concatenate([[x[0]] * 3, x, [x[-1]] * 3])
    assert np.allclose(med, [np.median(padded[i : i + 7]) for i in range(x.size)])
    # Gaussian noise around a trend and a level shift: its sigma, not the shift's size.
    t = np.arange(2000)
    y = 0.001 * t + 5.0 * (t > 1000) + rng.normal(0, 0.3, t.size)
    assert 0.2 < noise(y) < 0.35


@pytest.mark.parametrize("at", [150, 400])
def test_metric_and_layer_divergence_found_at_the_planted_step(at):
    rng = np.random.default_rng()
    base = synthetic(rng, "a")
    other = synthetic(rng, "b", loss_jump_at=at, grad_jump=("fc2", at))
    result = compare([base, other])
    (pair,) = result.pairs
    assert pair.log and pair.common_steps == STEPS
    assert pair.first_divergence is not None and abs(pair.first_divergence - at) <= 3
    top = pair.layers[0]
    assert top.layer == "fc2" and "grad_norm" in top.diverged
    assert abs(top.first_divergence - at) <= 3
    # fc2 is a decade apart after `at`: its mean distance is about that share of a decade.
    share = (STEPS - at) / STEPS
    assert top.distances["grad_norm"] == pytest.approx(share, abs=0.08)
    for row in pair.layers[1:]:
        assert row.first_divergence is None and row.score < 0.25 * top.score  # noise floor


def test_a_dead_fraction_jump_ranks_its_layer_first():
    rng = np.random.default_rng()
    base, other = synthetic(rng, "a"), synthetic(rng, "b", dead_jump=("fc3", 300))
    (pair,) = compare([base, other]).pairs
    assert pair.first_divergence is None
    top = pair.layers[0]
    assert top.layer == "fc3" and top.diverged == ("dead_frac",)
    assert abs(top.first_divergence - 300) <= 3
    assert top.distances["dead_frac"] == pytest.approx(0.2, abs=0.03)


def test_runs_that_differ_only_by_noise_never_diverge():
    rng = np.random.default_rng()
    for _ in range(20):
        (pair,) = compare([synthetic(rng, "a"), synthetic(rng, "b")]).pairs
        assert pair.first_divergence is None
        assert all(row.first_divergence is None for row in pair.layers)


def test_a_short_spike_is_not_a_divergence_but_a_lasting_jump_is():
    rng = np.random.default_rng()
    base = synthetic(rng, "a")
    (pair,) = compare([base, synthetic(rng, "b", spike_at=300)]).pairs
    assert pair.first_divergence is None
    (pair,) = compare([base, synthetic(rng, "b", spike_at=300, loss_jump_at=450)]).pairs
    assert abs(pair.first_divergence - 450) <= 3


def test_runs_of_different_lengths_are_compared_on_common_steps():
    rng = np.random.default_rng()
    base = synthetic(rng, "a")
    short = synthetic(rng, "b", loss_jump_at=250, steps=400)
    (pair,) = compare([base, short]).pairs
    assert pair.common_steps == 400 and abs(pair.first_divergence - 250) <= 3
    # Noise-free identical curves: nothing differs, and no division by a zero band.
    flat = RunData("c", np.arange(50), np.ones(50))
    assert first_divergence(flat.step, flat.values, flat.values) is None


def test_layers_in_one_run_only_are_listed_and_three_runs_pair_with_the_first():
    rng = np.random.default_rng()
    base = synthetic(rng, "a")
    other = synthetic(rng, "b", grad_jump=("fc1", 100))
    other.series = {k: v for k, v in other.series.items() if not k.endswith("/fc3")}
    other.series["grad_norm/extra"] = np.ones(STEPS)
    third = synthetic(rng, "c", loss_jump_at=500)
    result = compare([base, other, third])
    first, second = result.pairs
    assert (first.baseline, first.other, second.other) == ("a", "b", "c")
    assert first.only_in_baseline == ["fc3"] and first.only_in_other == ["extra"]
    assert first.layers[0].layer == "fc1" and first.first_divergence is None
    assert abs(second.first_divergence - 500) <= 3
    with pytest.raises(ValueError, match="at least two runs"):
        compare([base])


def ev(kind, step, layer=None):
    return Event(kind, step, step, "warning", f"{kind} at {step}", layer=layer)


def test_events_of_one_kind_at_about_the_same_step_share_a_row():
    a = RunData("a", np.arange(10), np.ones(10), events=[ev("spike", 100), ev("plateau", 10)])
    b = RunData(
        "b",
        np.arange(10),
        np.ones(10),
        events=[ev("spike", 103), ev("spike", 300), ev("dead_units", 50, "fc1")],
    )
    c = RunData("c", np.arange(10), np.ones(10), events=[ev("dead_units", 52, "fc2")])
    rows = align_events([a, b, c], tolerance=5)
    got = [(r.kind, r.step, [e.step if e else None for e in r.events]) for r in rows]
    assert got == [
        ("plateau", 10, [10, None, None]),
        ("dead_units", 50, [None, 50, None]),
        ("dead_units", 52, [None, None, 52]),  # another layer: its own row
        ("spike", 100, [100, 103, None]),
        ("spike", 300, [None, 300, None]),
    ]


def test_runs_written_to_disk_compare_like_their_arrays(tmp_path):
    from torchvitals.analysis.runtables import series_from_run
    from torchvitals.store.reader import load_run
    from torchvitals.store.writer import RunWriter

    rng = np.random.default_rng()
    runs = []
    for name, kw in (("a", {}), ("b", {"loss_jump_at": 200, "grad_jump": ("fc3", 200)})):
        data = synthetic(rng, name, steps=300, **kw)
        with RunWriter(tmp_path / name, manifest={"world_size": 1}, on_full="block") as w:
            for s in range(300):
                w.submit("scalars", {"step": s, "name": "loss", "value": float(data.values[s])})
                sumsq = [float(data.series[f"grad_norm/{n}"][s]) ** 2 for n in LAYERS]
                w.submit(
                    "layers",
                    {"step": s, "layer": list(LAYERS), "kind": "grad", "numel": 10, "sumsq": sumsq},
                )
        arrays = series_from_run(load_run(tmp_path / name))
        runs.append(RunData.from_arrays(name, arrays))
        assert np.allclose(runs[-1].values, data.values)
    (pair,) = compare(runs).pairs
    assert abs(pair.first_divergence - 200) <= 3 and pair.layers[0].layer == "fc3"


def test_zero_gradient_norms_are_left_out_of_the_log_comparison_not_the_layer():
    rng = np.random.default_rng()
    base = synthetic(rng, "a")
    other = synthetic(rng, "b", grad_jump=("fc2", 300))
    zeros = rng.choice(STEPS, 30, replace=False)
    base.series["grad_norm/fc2"][zeros] = 0.0  # a step whose gradient was exactly zero
    (pair,) = compare([base, other]).pairs
    top = pair.layers[0]
    assert top.layer == "fc2" and abs(top.first_divergence - 300) <= 3
    assert top.distances["grad_norm"] == pytest.approx(0.5, abs=0.08)  # decades, half the run
