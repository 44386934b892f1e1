"""tensor_stats against the float64 reference over seeded random tensor lists in every
form (negated and conjugated views included): 0 wrong numbers. More cases:
``python benchmarks/fuzz_engine.py``."""

from __future__ import annotations

import pytest
import torch
from tensor_fuzz import fuzz

import torchvitals

# (seed, calls, CPU threads): most calls on one thread (a call on two costs ~1 ms of
# thread start-up on a small input), some on the default pool. About 5,000 tensors.
RUNS = [(0, 1200, 1), (1, 300, None)]


@pytest.mark.parametrize(("seed", "cases", "threads"), RUNS)
def test_fuzzed_tensor_lists_match_the_reference(seed, cases, threads):
    before = torch.get_num_threads()
    torch.set_num_threads(threads or before)
    try:
        cases, tensors, failures = fuzz(seed, cases)
    finally:
        torch.set_num_threads(before)
    print(f"seed {seed}: {cases} calls, {tensors} tensors, {len(failures)} wrong")
    assert failures == [], failures[:5]


def test_negation_bit_is_read_with_its_sign():
    x = torch.tensor([[1.0, -2.0], [3.0, -4.0]])
    neg = torch._neg_view(x)
    assert neg.is_neg()
    got = torchvitals.tensor_stats([x, neg, -x], feature_dim=1)
    assert got["sum"].tolist() == [-2.0, 2.0, 2.0]
    assert got["dead_units"].tolist() == [1, 1, 1]  # column 1 of x, column 0 of -x
    assert torch.equal(got["neg_hist"][1], got["neg_hist"][2])  # the signs of -x
    assert not torch.equal(got["neg_hist"][0], got["neg_hist"][1])
    z = torch.tensor([1 + 2j, 3 - 4j]).conj()
    assert torchvitals.tensor_stats(z.imag)["sum"].tolist() == [2.0]  # -2 + 4


def test_nested_tensors_are_refused_by_index():
    nt = torch.nested.nested_tensor([torch.ones(2, 3), torch.ones(4, 3)])
    for dims in (None, [None, 1]):
        with pytest.raises(TypeError, match=r"tensors\[1\] is a nested tensor"):
            torchvitals.tensor_stats([torch.ones(2), nt], feature_dim=dims)
