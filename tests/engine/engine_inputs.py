"""Random tensors with planted special values, shared by the engine tests."""

from __future__ import annotations

import math

import torch

DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def special_values(dtype: torch.dtype) -> list[float]:
    info = torch.finfo(dtype)
    # fp64 sums of values near its max overflow in any order; keep float64 sums finite.
    huge = min(info.max / 2, 2.0**500)
    return [
        math.nan,
        math.inf,
        -math.inf,
        0.0,
        -0.0,
        info.tiny / 4,  # subnormal (rounds to 0 in bf16's short mantissa only when too small)
        -info.tiny / 2,
        huge,  # huge but finite
        -huge / 1.5,
        2.0**-70,  # below the histogram window where representable
        2.0**20,  # above the histogram window
    ]


def random_tensor(
    gen: torch.Generator, shape: tuple[int, ...], dtype: torch.dtype, specials: float = 0.05
) -> torch.Tensor:
    """Log-uniform magnitudes over many decades, random signs, planted special values."""
    numel = math.prod(shape)
    exponents = torch.empty(numel, dtype=torch.float64).uniform_(-30, 10, generator=gen)
    signs = torch.randint(0, 2, (numel,), generator=gen, dtype=torch.float64) * 2 - 1
    values = signs * torch.pow(2.0, exponents)
    mask = torch.rand(numel, generator=gen) < specials
    choices = torch.tensor(special_values(dtype), dtype=torch.float64)
    picks = torch.randint(0, len(choices), (int(mask.sum()),), generator=gen)
    values[mask] = choices[picks]
    return values.to(dtype).reshape(shape)


def random_shape(gen: torch.Generator, max_numel: int = 4096) -> tuple[int, ...]:
    ndim = int(torch.randint(0, 5, (1,), generator=gen))
    shape = []
    for _ in range(ndim):
        shape.append(int(torch.randint(0, 9, (1,), generator=gen)))
    while math.prod(shape) > max_numel:
        shape[shape.index(max(shape))] //= 2
    return tuple(shape)


def non_contiguous(t: torch.Tensor) -> torch.Tensor:
    """A strided view with the same values: transposed when possible, else every other element."""
    if t.dim() >= 2:
        return t.transpose(0, -1).contiguous().transpose(0, -1)
    doubled = torch.stack([t, torch.zeros_like(t)], dim=-1)
    return doubled[..., 0]
