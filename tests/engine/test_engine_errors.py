"""Bad input to tensor_stats: a clear error naming the tensor and the problem."""

from __future__ import annotations

import pytest
import torch

import torchvitals
from torchvitals.engine.op import fused_stats


@pytest.mark.parametrize(
    ("bad", "error", "message"),
    [
        (torch.arange(4), TypeError, r"tensors\[1\] has dtype torch.int64"),
        (
            torch.ones(3, dtype=torch.complex64),
            TypeError,
            r"tensors\[1\] has dtype torch.complex64",
        ),
        (torch.ones(3, dtype=torch.bool), TypeError, r"tensors\[1\] has dtype torch.bool"),
        (torch.ones(3).to_sparse(), TypeError, r"tensors\[1\] has layout"),
        (torch.ones(3, device="meta"), ValueError, r"tensors\[1\] is on the meta device"),
        ([1.0, 2.0], TypeError, r"tensors\[1\] is a list"),
    ],
)
def test_bad_tensor_is_named(bad, error, message):
    with pytest.raises(error, match=message):
        torchvitals.tensor_stats([torch.ones(2), bad])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_mixed_devices_are_named():
    with pytest.raises(ValueError, match=r"tensors\[1\] is on cuda:0 but tensors\[0\] is on cpu"):
        torchvitals.tensor_stats([torch.ones(2), torch.ones(2, device="cuda")])


def test_bad_feature_dim_is_named():
    with pytest.raises(
        ValueError, match=r"feature_dim=2 is out of range for tensors\[1\] of shape \(4,\)"
    ):
        torchvitals.tensor_stats([torch.ones(3, 3, 3), torch.ones(4)], feature_dim=2)
    with pytest.raises(ValueError, match=r"out of range for tensors\[0\] of shape \(\)"):
        torchvitals.tensor_stats(torch.tensor(1.0), feature_dim=0)
    with pytest.raises(TypeError, match=r"feature_dim for tensors\[0\] must be an int"):
        torchvitals.tensor_stats(torch.ones(2), feature_dim=1.5)
    with pytest.raises(ValueError, match="feature_dim has 1 entries but 2 tensors"):
        torchvitals.tensor_stats([torch.ones(2), torch.ones(2)], feature_dim=[0])


def test_nested_tensor_is_named():
    nested = torch.nested.nested_tensor([torch.ones(2, 3), torch.ones(4, 3)])
    for feature_dim in (None, [None, 1]):
        with pytest.raises(TypeError, match=r"tensors\[1\] is a nested tensor"):
            torchvitals.tensor_stats([torch.ones(2, 2), nested], feature_dim=feature_dim)
    jagged = torch.nested.nested_tensor([torch.ones(2, 3), torch.ones(4, 3)], layout=torch.jagged)
    with pytest.raises(TypeError, match=r"tensors\[0\] has layout torch.jagged"):
        torchvitals.tensor_stats([jagged], feature_dim=1)


def test_negated_views_are_read_with_their_sign():
    x = torch.tensor([[1.0, -2.0, 0.5], [3.0, -4.0, 0.25]])
    neg = torch._neg_view(x)
    got = torchvitals.tensor_stats([x, neg, neg.t(), -x], feature_dim=[1, 1, 0, 1])
    assert got["sum"].tolist() == [-1.25, 1.25, 1.25, 1.25]
    assert got["dead_units"].tolist() == [1, 2, 2, 2]
    imag = torch.tensor([1 + 2j, 3 - 4j, 5 + 0j]).conj().imag  # a negated, strided view
    assert imag.is_neg() and torchvitals.tensor_stats(imag)["sum"].tolist() == [2.0]


def test_bad_saturation_is_named():
    with pytest.raises(ValueError, match=r"saturation for tensors\[0\] must be >= 0"):
        torchvitals.tensor_stats(torch.ones(2), saturation=-1.0)


def test_works_under_torch_compile():
    def f(x):
        y = torch.relu(x * 2)
        return y, torchvitals.tensor_stats([x, y], feature_dim=[None, -1])

    compiled = torch.compile(f, fullgraph=True)
    x = torch.randn(16, 8)
    x[:, 3] = -1.0
    _, stats = compiled(x)
    _, eager = f(x)
    for key in stats:
        assert torch.equal(stats[key], eager[key]), key
    assert stats["dead_units"].tolist() == [0, 1]


def test_inputs_requiring_grad_are_accepted():
    w = torch.randn(5, requires_grad=True)
    got = torchvitals.tensor_stats([w * 2])
    assert got["numel"].tolist() == [5] and not got["sum"].requires_grad


@pytest.mark.parametrize(
    ("rectified_of", "message"),
    [
        ([None, 0, None], r"rectified_of has 3 entries for 2 tensors"),
        ([None, 2], r"rectified_of\[1\] must be None or a tensor index, got 2"),
        ([None, "0"], r"rectified_of\[1\] must be None or a tensor index"),
        ([None, True], r"rectified_of\[1\] must be None or a tensor index"),
        ([1, 0], r"rectified_of\[0\]=1: tensors\[0\] has a saturation threshold"),
    ],
)
def test_bad_rectified_of_is_named(rectified_of, message):
    x = torch.randn(4, 3)
    with pytest.raises(ValueError, match=message):
        fused_stats([x, x.relu()], saturation=[1.0, None], rectified_of=rectified_of)


def test_a_rectified_row_needs_the_layout_and_no_units_of_its_source():
    x = torch.randn(4, 3)
    cases = [
        ([x, x.relu().t().contiguous().t()], None, "dtype, shape and layout"),
        ([x, x.relu().double()], None, "dtype, shape and layout"),
        ([x, x.relu()], [1, None], r"would take the units of tensors\[0\]"),
        ([x, x], None, "dtype, shape and layout"),  # a tensor is no rectified copy of itself
    ]
    for tensors, dims, message in cases:
        with pytest.raises(ValueError, match=message):
            fused_stats(tensors, feature_dim=dims, rectified_of=[None, 0])
    with pytest.raises(ValueError, match="itself derived"):
        fused_stats([x, x.relu(), x.relu().relu()], rectified_of=[None, 0, 1])
    with pytest.raises(ValueError, match="another derived tensor"):
        fused_stats([x, x.relu(), x.relu()], rectified_of=[None, 0, 0])
