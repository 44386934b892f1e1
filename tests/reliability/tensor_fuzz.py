"""Seeded random tensor lists for tensor_stats, in every form PyTorch can hand the engine
(dtypes, empty and scalar shapes, transposed, strided, overlapping, channels-last,
offset, negated and conjugated views, special values), checked against the float64
reference. Shared by tests/reliability/test_tensor_fuzz.py and benchmarks/fuzz_engine.py."""

from __future__ import annotations

import math
import random

import torch

from torchvitals.engine.op import tensor_stats
from torchvitals.engine.reference import STAT_KEYS, tensor_stats_reference

DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
VIEWS = (
    "plain", "transpose", "step_slice", "expand", "neg", "neg_transpose", "conj_imag",
    "conj_real", "channels_last", "offset", "permute", "flip_sign_of_copy",
)  # fmt: skip
EXACT_KEYS = [k for k in STAT_KEYS if k not in ("sum", "sumsq")]
REL = 1e-12  # sums: both sides accumulate in float64


def _values(rng: random.Random, numel: int, dtype: torch.dtype) -> torch.Tensor:
    """Log-uniform magnitudes over a random range of decades, random signs, and a random
    share of special values (NaN, infinities, signed zeros, subnormals, huge)."""
    info = torch.finfo(dtype)
    specials = torch.tensor(
        [math.nan, math.inf, -math.inf, 0.0, -0.0, info.tiny / 4, -info.tiny / 2,
         min(info.max / 2, 2.0**500), 2.0**-70, 2.0**20],
        dtype=torch.float64,
    )  # fmt: skip
    gen = torch.Generator().manual_seed(rng.randrange(2**62))
    lo, hi = sorted((rng.uniform(-40, 12), rng.uniform(-40, 12)))
    exponents = torch.rand(numel, generator=gen, dtype=torch.float64) * (hi - lo) + lo
    signs = torch.randint(0, 2, (numel,), generator=gen, dtype=torch.float64) * 2 - 1
    values = signs * torch.pow(2.0, exponents)
    special = torch.rand(numel, generator=gen) < rng.choice((0.0, 0.02, 0.2))
    picks = torch.randint(0, len(specials), (int(special.sum()),), generator=gen)
    values[special] = specials[picks]
    return values.to(dtype)


def _shape(rng: random.Random) -> tuple[int, ...]:
    ndim = rng.choice((0, 1, 1, 2, 2, 3, 4))
    shape = [rng.choice((0, 1, 2, 3, 5, 8, 13)) if rng.random() < 0.9 else 0 for _ in range(ndim)]
    while math.prod(shape) > 1024:
        shape[shape.index(max(shape))] //= 2
    return tuple(shape)


def _view(rng: random.Random, how: str, dtype: torch.dtype) -> torch.Tensor:
    shape = _shape(rng)
    if how == "conj_imag" or how == "conj_real":
        if dtype not in (torch.float32, torch.float64):
            how = "neg"
        else:
            cdtype = torch.complex64 if dtype == torch.float32 else torch.complex128
            parts = _values(rng, 2 * math.prod(shape), dtype).reshape(*shape, 2)
            z = torch.view_as_complex(parts.contiguous()).to(cdtype).conj()
            return z.imag if how == "conj_imag" else z.real
    base = _values(rng, math.prod(shape), dtype).reshape(shape)
    if how == "transpose" and base.dim() >= 2:
        return base.transpose(0, -1)
    if how == "step_slice" and base.dim() >= 1:
        big = _values(rng, 2 * math.prod(shape) + 2, dtype)[1:-1]
        return (
            big[::2].reshape(shape)
            if base.dim() == 1
            else big[: 2 * base.numel()][::2].reshape(shape)
        )
    if how == "expand":
        return base.unsqueeze(0).expand(3, *shape)
    if how == "neg":
        return torch._neg_view(base)
    if how == "neg_transpose" and base.dim() >= 2:
        return torch._neg_view(base.transpose(0, 1))
    if how == "channels_last" and base.dim() == 4:
        return base.contiguous(memory_format=torch.channels_last)
    if how == "offset" and base.numel():
        big = _values(rng, base.numel() + 3, dtype)
        return big[3:].reshape(shape)
    if how == "permute" and base.dim() >= 3:
        return base.permute(2, 0, 1, *range(3, base.dim()))
    if how == "flip_sign_of_copy":
        return -base  # a real negation (no bit): the control for "neg"
    return base


def random_case(rng: random.Random):
    """``(tensors, feature_dim list, saturation list, view names)`` of one call."""
    tensors, dims, sats, views = [], [], [], []
    dtype = rng.choice(DTYPES) if rng.random() < 0.5 else None
    for _ in range(rng.randint(1, 6)):
        how = rng.choice(VIEWS)
        t = _view(rng, how, dtype or rng.choice(DTYPES))
        tensors.append(t)
        views.append(how)
        dims.append(rng.randrange(-t.dim(), t.dim()) if t.dim() and rng.random() < 0.6 else None)
        sats.append(None if rng.random() < 0.3 else 2.0 ** rng.randint(-20, 8))
    if len({t.dtype for t in tensors}) > 1 and rng.random() < 0.5:
        tensors = [t.to(torch.float32) for t in tensors]  # sometimes one dtype for all
    return tensors, dims, sats, views


def check_case(tensors, dims, sats) -> str | None:
    """``None`` if tensor_stats equals the reference (sums within REL of sum |x|), else why."""
    got = tensor_stats(tensors, feature_dim=dims, saturation=sats)
    want = tensor_stats_reference(tensors, feature_dim=dims, saturation=sats)
    for key in EXACT_KEYS:
        if not torch.equal(got[key].to(want[key].dtype), want[key]):
            bad = (got[key].to(want[key].dtype) != want[key]).reshape(len(tensors), -1).any(1)
            i = int(bad.nonzero()[0])
            return f"{key} of tensors[{i}]: {got[key][i].tolist()} != {want[key][i].tolist()}"
    for i, t in enumerate(tensors):
        x = t.detach().to(torch.float64)
        finite = x[torch.isfinite(x)]
        for key, scale in (("sum", finite.abs().sum()), ("sumsq", (finite * finite).sum())):
            g, w = float(got[key][i]), float(want[key][i])
            if math.isinf(w) or math.isinf(g):
                if g != w:
                    return f"{key} of tensors[{i}]: {g} != {w}"
            elif abs(g - w) > REL * float(scale) + 1e-300:
                return f"{key} of tensors[{i}]: {g} != {w}"
    if not torch.equal(got["hist"].sum(1), got["numel"]):
        return "histogram rows do not add up to numel"
    return None


def fuzz(seed: int, cases: int) -> tuple[int, int, list[str]]:
    """``(cases, tensors, failures)`` of ``cases`` seeded random calls."""
    rng = random.Random(seed)
    failures, tensors_seen = [], 0
    for k in range(cases):
        tensors, dims, sats, views = random_case(rng)
        tensors_seen += len(tensors)
        why = check_case(tensors, dims, sats)
        if why is not None:
            shapes = [
                (tuple(t.shape), t.stride(), str(t.dtype), v)
                for t, v in zip(tensors, views, strict=True)
            ]
            failures.append(f"seed {seed} case {k}: {why}; {shapes}; feature_dim={dims}")
    return cases, tensors_seen, failures
