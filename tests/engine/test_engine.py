"""The compiled engine against the float64 reference, on fresh random inputs every run."""

from __future__ import annotations

import math
import random

import pytest
import torch
from engine_inputs import DTYPES, non_contiguous, random_shape, random_tensor, special_values

import torchvitals
from torchvitals.engine import histogram
from torchvitals.engine.op import fused_stats
from torchvitals.engine.reference import STAT_KEYS, tensor_stats_reference

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
EXACT_KEYS = [k for k in STAT_KEYS if k not in ("sum", "sumsq")]


def fresh_generator() -> torch.Generator:
    seed = random.SystemRandom().randrange(2**31)
    print(f"seed={seed}")  # shown by pytest on failure
    return torch.Generator().manual_seed(seed)


def assert_matches_reference(tensors, feature_dims, thresholds, device, rel=None):
    """Integer statistics and max|x| must match exactly; sums within the documented bound."""
    got = torchvitals.tensor_stats(
        [t.to(device) for t in tensors], feature_dim=feature_dims, saturation=thresholds
    )
    want = tensor_stats_reference(tensors, feature_dim=feature_dims, saturation=thresholds)
    assert set(got) == set(STAT_KEYS)
    for key in EXACT_KEYS:
        assert got[key].device.type == device
        assert torch.equal(got[key].cpu().to(want[key].dtype), want[key]), key
    # Sums: bounded relative to the sum of |x| over finite elements (what rounding scales with).
    rel = rel if rel is not None else 1e-12  # float64 accumulation on both backends
    for i, t in enumerate(tensors):
        x = t.double()
        finite = x[torch.isfinite(x)]
        for key, scale in (("sum", finite.abs().sum()), ("sumsq", (finite * finite).sum())):
            g, w = float(got[key][i]), float(want[key][i])
            if math.isinf(w):
                assert g == w, (key, i)
            else:
                assert abs(g - w) <= rel * float(scale) + 1e-300, (key, i, g, w)
    assert torch.equal(got["hist"].sum(1).cpu(), got["numel"].cpu())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_random_shapes_match_reference(device, dtype):
    gen = fresh_generator()
    tensors = [random_tensor(gen, random_shape(gen), dtype) for _ in range(40)]
    tensors += [random_tensor(gen, (0,), dtype), random_tensor(gen, (3, 0, 2), dtype)]
    thresholds = [None if i % 3 == 0 else 2.0 ** (i % 7) for i in range(len(tensors))]
    assert_matches_reference(tensors, [None] * len(tensors), thresholds, device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_non_contiguous_views(device, dtype):
    gen = fresh_generator()
    tensors = [non_contiguous(random_tensor(gen, (5, 7, 3), dtype)) for _ in range(4)]
    tensors.append(random_tensor(gen, (64, 33), dtype)[:, 1::2])
    assert not tensors[-1].is_contiguous()
    dims = [1, -1, 0, None, -1]
    assert_matches_reference(tensors, dims, 1.0, device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_dense_layouts_read_in_place(device, dtype):
    """Channels-last and permuted tensors are read in memory order, without a copy; units
    along any dim must still come out right."""
    gen = fresh_generator()
    conv = random_tensor(gen, (4, 6, 5, 3), dtype).to(memory_format=torch.channels_last)
    assert not conv.is_contiguous()
    permuted = random_tensor(gen, (3, 4, 5), dtype).permute(2, 0, 1)
    tensors = [conv, conv, permuted, permuted, permuted]
    assert_matches_reference(tensors, [1, 3, 0, 1, 2], 0.5, device)


@pytest.mark.parametrize("device", DEVICES)
def test_multi_chunk_tensors(device):
    """Tensors spanning several work chunks, with ragged tails and an odd offset."""
    gen = fresh_generator()
    chunk = torchvitals._C.CHUNK_ELEMS
    tensors = [
        random_tensor(gen, (3 * chunk + 17,), torch.float32),
        random_tensor(gen, (2 * chunk + 1,), torch.float32)[1:],  # misaligned start
        random_tensor(gen, (4, chunk // 2 + 3), torch.bfloat16),
        random_tensor(gen, (chunk + 5, 2), torch.float64),
    ]
    assert_matches_reference(tensors, [None, None, 0, 1], 0.5, device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_chunks_without_negative_elements(device, dtype):
    """Rectifier outputs: the CPU kernel skips the negative row for chunks whose elements
    all have a clear sign bit. A lone negative, a -0.0 or a NaN in one chunk of many must
    not be lost, nor counted in the negative row when it is no negative."""
    gen = fresh_generator()
    chunk = torchvitals._C.CHUNK_ELEMS
    relu = random_tensor(gen, (3 * chunk + 5,), dtype).abs()
    lone_negative, negative_zero, nan = relu.clone(), relu.clone(), relu.clone()
    where = int(torch.randint(chunk, 2 * chunk, (1,), generator=gen))
    lone_negative[where] = -3.0
    negative_zero[where] = -0.0
    nan[where] = -math.nan
    short_runs = relu[: 2 * chunk].view(-1, 64)  # units along the last dim
    long_runs = lone_negative[: 2 * chunk].view(16, 64, -1)  # runs of 128 along dim 1
    tensors = [relu, lone_negative, negative_zero, nan, short_runs, long_runs]
    assert_matches_reference(
        tensors, [None, None, None, None, 1, 1], [None, 2.0, None, 2.0, None, None], device
    )


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_rectified_rows_equal_a_pass_over_them(device, dtype):
    """A ReLU's output named by ``rectified_of`` is taken from the pass over its input (on
    the CPU): every statistic bit for bit what reading it gives, its units included
    (short runs, long runs, channels-last); the input's row keeps its counts and histogram
    exactly and its sums within the bound (they are summed run by run along the units)."""
    gen = fresh_generator()
    chunk = torchvitals._C.CHUNK_ELEMS
    sources = [
        random_tensor(gen, (2 * chunk + 37,), dtype),
        random_tensor(gen, (8, 16, 24, 24), dtype),  # runs of 576 along dim 1
        random_tensor(gen, (8, 16, 4, 5), dtype).to(memory_format=torch.channels_last),
        random_tensor(gen, (300, 7), dtype),  # runs of one along the last dim
        random_tensor(gen, (0, 3), dtype),
    ]
    unit_dims = [None, 1, 1, -1, 1]
    tensors, dims, thresholds, rectified_of = [], [], [], []
    for x, dim in zip(sources, unit_dims, strict=True):
        tensors += [x, torch.relu(x)]
        dims += [None, dim]
        thresholds += [2.0, None]
        rectified_of += [None, len(tensors) - 2]
    tensors = [t.to(device) for t in tensors]
    got = fused_stats(tensors, feature_dim=dims, saturation=thresholds, rectified_of=rectified_of)
    want = fused_stats(tensors, feature_dim=dims, saturation=thresholds)
    derived = torch.tensor([j is not None for j in rectified_of], device=device)
    for g, w in zip(got, want, strict=True):
        assert torch.equal(g[derived], w[derived])
    assert torch.equal(got[1], want[1]) and torch.equal(got[2], want[2])
    scale = torch.stack(
        [t.double().nan_to_num(0, 0, 0).abs().sum() for t in tensors]
    ).to(device)  # fmt: skip
    squares = torch.stack([t.double().nan_to_num(0, 0, 0).square().sum() for t in tensors])
    assert ((got[0][:, 0] - want[0][:, 0]).abs() <= 1e-12 * scale).all()
    assert ((got[0][:, 1] - want[0][:, 1]).abs() <= 1e-12 * squares.to(device)).all()


def test_rectified_rows_are_read_when_subnormals_are_flushed():
    """With torch.set_flush_denormal(True), torch.relu turns positive subnormals into
    zeros, which a row derived from its input would not: the engine reads it instead."""
    x = torch.tensor([1e-40, -1e-40, 2.0, -3.0, 5e-39] * 100, dtype=torch.float32)
    if not torch.set_flush_denormal(True):
        pytest.skip("this CPU cannot flush subnormals")
    try:
        y = torch.relu(x)
        got = fused_stats([x, y], rectified_of=[None, 0])
        want = fused_stats([x, y])
    finally:
        torch.set_flush_denormal(False)
    for g, w in zip(got, want, strict=True):
        assert torch.equal(g[1], w[1])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("count", [1, 2000])
def test_tensor_lists(device, count):
    gen = fresh_generator()
    tensors = [
        random_tensor(gen, random_shape(gen, max_numel=64), torch.float32) for _ in range(count)
    ]
    assert_matches_reference(tensors, None, 1.0, device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_dead_and_saturated_units(device, dtype):
    gen = fresh_generator()
    conv = torch.rand(8, 16, 5, 5, generator=gen).to(dtype) - 0.5  # NCHW, units along dim 1
    linear = torch.rand(4, 6, 32, generator=gen).to(dtype) - 0.5  # [..., F], units along dim -1
    conv_units = torch.randperm(16, generator=gen)
    dead_conv, saturated = conv_units[:5], conv_units[5:8]
    dead_linear = torch.randperm(32, generator=gen)[:9]
    conv[:, dead_conv] = -conv[:, dead_conv].abs()
    conv[:, dead_conv[0]] = 0.0  # all-zero units are dead too
    linear[..., dead_linear] = -linear[..., dead_linear].abs()
    conv[:, saturated] = 2.0
    conv[0, saturated[0], 0, 0] = math.nan  # a NaN keeps a unit from counting as saturated
    tensors = [conv, linear]
    got = torchvitals.tensor_stats(
        [t.to(device) for t in tensors], feature_dim=[1, -1], saturation=1.5
    )
    assert got["units"].tolist() == [16, 32]
    assert got["dead_units"].tolist() == [5, 9]
    assert got["saturated_units"].tolist() == [2, 0]
    assert_matches_reference(tensors, [1, -1], 1.5, device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_long_unit_runs_and_concentrated_values(device, dtype):
    """Activation-like tensors: Gaussian values (most within a few octaves, which the CPU
    histogram counts with vectors) with planted outliers, tiny values and specials, and
    units whose runs are long (flagged inside the first pass), cross chunk boundaries and
    end in ragged vectors; a zero threshold counts the zero padding of short vectors too."""
    gen = fresh_generator()
    conv = torch.randn(8, 40, 6, 7, generator=gen, dtype=torch.float64)  # runs of 42
    big = torch.randn(3, 9, 100, 97, generator=gen, dtype=torch.float64)  # runs cross chunks
    conv[:, :6] = -conv[:, :6].abs()  # dead units
    conv[:, 6:9] = 3.0 * conv[:, 6:9].sign()  # saturated units at 1.5
    conv[2, 7, 1, 1] = math.nan
    big[1, 4] = 0.0
    flat = big.flatten()
    picks = torch.randint(0, flat.numel(), (200,), generator=gen)
    specials = torch.tensor(special_values(dtype), dtype=torch.float64)
    flat[picks] = specials[torch.arange(200) % len(specials)]
    flat[picks[:50]] *= 2.0**-40  # far below the chunk's top octave
    tensors = [t.to(dtype) for t in (conv, big, conv.abs())]
    for thresholds in ([1.5, 1.5, 0.0], [None, 0.25, 1.5]):
        assert_matches_reference(tensors, [1, 1, 1], thresholds, device)


@pytest.mark.parametrize("device", DEVICES)
def test_histogram_bins_are_powers_of_two(device):
    values = torch.tensor(
        [
            0.0,
            -0.0,
            1.0,
            1.5,
            -2.0,
            3.99,
            2.0**-64,
            2.0**-65,
            2.0**15,
            2.0**16,
            math.nan,
            -math.inf,
        ],
        dtype=torch.float64,
    )
    stats = torchvitals.tensor_stats(values.to(device))
    first = histogram.FIRST_EXP_BIN - histogram.MIN_EXP  # bin of 2^0
    expected = torch.zeros(histogram.NUM_BINS, dtype=torch.int64)
    for b in (
        histogram.ZERO_BIN, histogram.ZERO_BIN, first, first, first + 1, first + 1,
        histogram.FIRST_EXP_BIN, histogram.BELOW_BIN, histogram.ABOVE_BIN - 1,
        histogram.ABOVE_BIN, histogram.NONFINITE_BIN, histogram.NONFINITE_BIN,
    ):  # fmt: skip
        expected[b] += 1
    assert torch.equal(stats["hist"][0].cpu(), expected)
    # Negative: -2.0 and -inf; -0.0 and NaN never are.
    negative = torch.zeros(histogram.NUM_BINS, dtype=torch.int64)
    negative[first + 1] = negative[histogram.NONFINITE_BIN] = 1
    assert torch.equal(stats["neg_hist"][0].cpu(), negative)


def test_hist_edges_describe_every_bin():
    layout = torchvitals.hist_edges()
    assert len(layout.labels) == len(layout.lower) == len(layout.upper) == histogram.NUM_BINS
    gen = fresh_generator()
    x = random_tensor(gen, (5000,), torch.float64, specials=0.0).abs()
    row = torchvitals.tensor_stats(x)["hist"][0]
    for b in range(histogram.FIRST_EXP_BIN, histogram.ABOVE_BIN):
        inside = ((x >= layout.lower[b]) & (x < layout.upper[b])).sum()
        assert int(inside) == int(row[b])


@pytest.mark.parametrize("device", DEVICES)
def test_deterministic_run_to_run(device):
    gen = fresh_generator()
    tensors = [
        random_tensor(gen, (300_000,), torch.float32, specials=0.0).to(device) for _ in range(3)
    ]
    first = torchvitals.tensor_stats(tensors)
    for threads in (1, 2):
        torch.set_num_threads(threads)
        again = torchvitals.tensor_stats(tensors)
        for key in STAT_KEYS:
            assert torch.equal(first[key], again[key]), key


def test_empty_list_and_single_tensor():
    empty = torchvitals.tensor_stats([])
    assert empty["hist"].shape == (0, histogram.NUM_BINS)
    assert empty["numel"].shape == (0,)
    one = torchvitals.tensor_stats(torch.tensor(3.0))
    assert one["numel"].tolist() == [1] and one["max_abs"].tolist() == [3.0]


def test_all_nonfinite_tensor_has_zero_max_abs():
    got = torchvitals.tensor_stats(torch.tensor([math.nan, math.inf]))
    assert got["max_abs"].tolist() == [0.0] and got["sum"].tolist() == [0.0]
    assert got["nan"].tolist() == [1] and got["inf"].tolist() == [1]


@pytest.mark.parametrize("device", DEVICES)
def test_tensor_over_2_pow_31_elements(device):
    x = torch.zeros(2, 2**30 + 3, dtype=torch.bfloat16, device=device)
    x[1, -1] = 4.0
    x[0, 7] = math.nan
    got = torchvitals.tensor_stats(x, feature_dim=0, saturation=3.0)
    assert got["numel"].tolist() == [2**31 + 6]
    assert got["zeros"].tolist() == [2**31 + 4]
    assert got["nan"].tolist() == [1] and got["saturated"].tolist() == [1]
    assert got["max_abs"].tolist() == [4.0] and got["sum"].tolist() == [4.0]
    assert got["dead_units"].tolist() == [1] and got["saturated_units"].tolist() == [0]
    assert got["hist"][0, histogram.ZERO_BIN].tolist() == 2**31 + 4


def _stats_in_child(x: torch.Tensor, queue) -> None:
    # Only the engine runs here: torch's own OpenMP pool is not usable after a fork.
    queue.put(torchvitals.tensor_stats(x)["sum"].tolist())


def test_engine_after_fork_and_from_several_threads():
    """The CPU engine runs on OpenMP threads: a fork()ed child (a DataLoader worker), where
    a parallel region would hang, reduces serially, and calls from several Python threads
    at once neither deadlock nor mix results."""
    import multiprocessing
    import threading

    chunk = torchvitals._C.CHUNK_ELEMS
    x = torch.arange(8 * chunk, dtype=torch.float32)
    expected = [float(x.double().sum())]
    torch.set_num_threads(2)
    assert torchvitals.tensor_stats(x)["sum"].tolist() == expected  # starts OpenMP
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=_stats_in_child, args=(x, queue))
    child.start()
    assert queue.get(timeout=60) == expected
    child.join(timeout=60)
    assert child.exitcode == 0

    gen = fresh_generator()
    inputs = [random_tensor(gen, (3 * chunk + 5,), torch.float32) for _ in range(4)]
    want = [torchvitals.tensor_stats(t) for t in inputs]
    got: dict[int, dict] = {}

    def worker(i: int) -> None:
        for _ in range(5):
            got[i] = torchvitals.tensor_stats(inputs[i])

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(inputs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    for i, w in enumerate(want):
        for key in STAT_KEYS:
            assert torch.equal(got[i][key], w[key]), (i, key)


_BASELINE_CHILD = """
import sys, torch, torchvitals
assert torchvitals._C.cpu_isa() == "baseline", torchvitals._C.cpu_isa()
tensors, dims, thresholds = torch.load(sys.argv[1])
torch.save(torchvitals.tensor_stats(tensors, feature_dim=dims, saturation=thresholds), sys.argv[2])
"""


def test_cpu_kernels_agree_bit_for_bit(tmp_path):
    """The portable CPU kernel (forced with TORCHVITALS_CPU_ISA=baseline, what CPUs without
    AVX2 run) gives the same bits as the one this CPU picks, sums included."""
    import os
    import subprocess
    import sys

    gen = fresh_generator()
    chunk = torchvitals._C.CHUNK_ELEMS
    tensors, dims, thresholds = [], [], []
    for dtype in DTYPES:
        tensors += [random_tensor(gen, random_shape(gen), dtype) for _ in range(4)]
        tensors.append(random_tensor(gen, (2 * chunk + 37,), dtype))
        gaussian = torch.randn(5, 24, 21, 23, generator=gen).to(dtype)  # unit runs of 483
        gaussian.view(-1)[:: chunk // 7] = math.nan
        tensors += [gaussian, gaussian.relu(), gaussian[:, :, 0, :5].contiguous()]
        dims += [None] * 5 + [1, 1, -1]
        thresholds += [None, 0.5, None, 2.0, 1.0, 2.0, None, 0.0]
    inputs, outputs = tmp_path / "inputs.pt", tmp_path / "outputs.pt"
    torch.save((tensors, dims, thresholds), inputs)
    env = dict(os.environ, TORCHVITALS_CPU_ISA="baseline")
    subprocess.run(
        [sys.executable, "-c", _BASELINE_CHILD, str(inputs), str(outputs)], env=env, check=True
    )
    baseline = torch.load(outputs)
    got = torchvitals.tensor_stats(tensors, feature_dim=dims, saturation=thresholds)
    for key in STAT_KEYS:
        assert torch.equal(got[key], baseline[key]), key
    assert_matches_reference(tensors, dims, thresholds, "cpu")
