"""The histogram binning rule, checked on every exponent: the rule as compiled for the
host (the function the CUDA kernel calls), the CPU kernel, the CUDA kernel where a GPU
is present, and the float64 reference all give each value the same slot: its bin, in the
negative row or not.

The rule reads only the sign, the exponent field and whether any mantissa bit is set, so
every exponent with both signs and a sample of mantissas (the edges, and random ones)
covers every case it distinguishes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from torchvitals import _C
from torchvitals.engine import histogram
from torchvitals.engine.op import fused_stats
from torchvitals.engine.reference import hist_bins, hist_negative

FORMATS = {
    # dtype: (bits dtype, mantissa bits, exponent bits, host rule)
    torch.float32: (np.uint32, 23, 8, _C.hist_slots_f32),
    torch.float64: (np.uint64, 52, 11, _C.hist_slots_f64),
}


def every_exponent(dtype: torch.dtype, mantissas_per_exponent: int = 24) -> np.ndarray:
    """Bit patterns: each sign and exponent field with mantissa 0, 1, 2, all ones, all ones
    but one, the top bit, and random mantissas."""
    bits_type, mantissa_bits, exponent_bits, _ = FORMATS[dtype]
    rng = np.random.default_rng(0)
    top = (1 << mantissa_bits) - 1
    edges = [0, 1, 2, top, top - 1, 1 << (mantissa_bits - 1)]
    random = rng.integers(1, top, size=mantissas_per_exponent, dtype=np.uint64).tolist()
    mantissas = np.array(edges + random, dtype=np.uint64)
    exponents = np.arange(1 << exponent_bits, dtype=np.uint64)
    signs = np.array([0, 1], dtype=np.uint64) << np.uint64(mantissa_bits + exponent_bits)
    bits = signs[:, None, None] | (exponents[None, :, None] << np.uint64(mantissa_bits))
    return (bits | mantissas[None, None, :]).reshape(-1).astype(bits_type)


def host_rule(dtype: torch.dtype, bits: np.ndarray) -> np.ndarray:
    out = np.empty(bits.size, dtype=np.int64)
    FORMATS[dtype][3](bits.ctypes.data, bits.size, out.ctypes.data)
    return out


def reference_slots(values: torch.Tensor) -> np.ndarray:
    return (hist_bins(values) + histogram.NUM_BINS * hist_negative(values)).numpy()


def kernel_slots(values: torch.Tensor) -> np.ndarray:
    """The slot the engine gives each value: one single-element tensor per value, in one call."""
    _, _, hist = fused_stats(list(values.reshape(-1, 1)))
    every, negative = hist.cpu().unbind(dim=1)
    assert (every.sum(dim=1) == 1).all()
    assert (negative.sum(dim=1) <= 1).all() and (negative <= every).all()
    return (every.argmax(dim=1) + histogram.NUM_BINS * negative.sum(dim=1)).numpy()


@pytest.mark.parametrize("dtype", list(FORMATS), ids=str)
def test_host_rule_matches_the_reference_on_every_exponent(dtype):
    bits = every_exponent(dtype)
    values = torch.from_numpy(bits.view(np.float32 if dtype == torch.float32 else np.float64))
    expected = reference_slots(values)
    np.testing.assert_array_equal(host_rule(dtype, bits), expected)
    # every bin is reached with each sign (but zeros and NaNs, never negative), so no part
    # of the rule goes untested
    never_negative = {histogram.NUM_BINS + histogram.ZERO_BIN}
    assert set(expected.tolist()) == set(range(2 * histogram.NUM_BINS)) - never_negative


@pytest.mark.parametrize("device", ["cpu", "cuda"])
@pytest.mark.parametrize("dtype", list(FORMATS), ids=str)
def test_kernel_bins_match_the_reference_on_every_exponent(device, dtype):
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no GPU")
    bits = every_exponent(dtype, mantissas_per_exponent=4)
    values = torch.from_numpy(bits.view(np.float32 if dtype == torch.float32 else np.float64))
    np.testing.assert_array_equal(kernel_slots(values.to(device)), reference_slots(values))


@pytest.mark.parametrize("device", ["cpu", "cuda"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_half_formats_bin_every_bit_pattern_like_the_reference(device, dtype):
    """All 65536 patterns of a 16-bit format: they widen exactly, then bin as fp32."""
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no GPU")
    values = torch.arange(1 << 16, dtype=torch.int32).to(torch.int16).view(dtype)
    widened = values.float().numpy().view(np.uint32)
    expected = reference_slots(values)
    np.testing.assert_array_equal(host_rule(torch.float32, widened), expected)
    np.testing.assert_array_equal(kernel_slots(values.to(device)), expected)
