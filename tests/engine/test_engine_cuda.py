"""CUDA-only properties: same answers as the CPU engine, no host sync, graph capture."""

from __future__ import annotations

import pytest
import torch
from engine_inputs import DTYPES, random_shape, random_tensor

import torchvitals
from torchvitals.engine.reference import STAT_KEYS

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")


def _tensors(seed: int, count: int = 64):
    gen = torch.Generator().manual_seed(seed)
    return [random_tensor(gen, random_shape(gen), DTYPES[i % len(DTYPES)]) for i in range(count)]


def test_cuda_equals_cpu_engine():
    cpu = _tensors(1)
    dims = [0 if t.dim() else None for t in cpu]
    want = torchvitals.tensor_stats(cpu, feature_dim=dims, saturation=1.0)
    got = torchvitals.tensor_stats([t.cuda() for t in cpu], feature_dim=dims, saturation=1.0)
    for key in STAT_KEYS:
        if key in ("sum", "sumsq"):  # both sum in float64, in different orders
            scale = [
                t.double().nan_to_num(0, 0, 0).abs().pow(2 if key == "sumsq" else 1).sum()
                for t in cpu
            ]
            assert ((got[key].cpu() - want[key]).abs() <= 1e-12 * torch.stack(scale)).all(), key
        else:
            assert torch.equal(got[key].cpu(), want[key]), key


def test_no_host_sync():
    tensors = [t.cuda() for t in _tensors(2)]
    torchvitals.tensor_stats(tensors, feature_dim=None, saturation=1.0)  # warm-up fills caches
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            torchvitals.tensor_stats(tensors, saturation=1.0)
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_cuda_graph_capture_and_replay():
    tensors = [torch.randn(1000, 37, device="cuda") for _ in range(5)]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        torchvitals.tensor_stats(tensors, feature_dim=1, saturation=2.0)  # warm-up
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = torchvitals.tensor_stats(tensors, feature_dim=1, saturation=2.0)
    for t in tensors:
        t.normal_()
    graph.replay()
    torch.cuda.synchronize()
    fresh = torchvitals.tensor_stats(tensors, feature_dim=1, saturation=2.0)
    for key in STAT_KEYS:
        assert torch.equal(captured[key], fresh[key]), key


def test_deterministic_sums_on_gpu():
    tensors = [torch.randn(3_000_000, device="cuda") for _ in range(3)]
    first = torchvitals.tensor_stats(tensors)
    for _ in range(3):
        again = torchvitals.tensor_stats(tensors)
        assert torch.equal(first["sum"], again["sum"]) and torch.equal(
            first["sumsq"], again["sumsq"]
        )
