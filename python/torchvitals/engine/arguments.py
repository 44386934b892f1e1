"""Argument forms shared by the engine and its reference."""

from __future__ import annotations


def per_tensor(value, count: int, name: str) -> list:
    """One value for every tensor, or a sequence with one value per tensor."""
    if value is None or isinstance(value, (int, float)):
        return [value] * count
    values = list(value)
    if len(values) != count:
        raise ValueError(f"{name} has {len(values)} entries but {count} tensors were given")
    return values
