"""nh64, the record batches' body checksum: the compiled function equals its definition
(NumPy, below) on fresh random inputs of every length class, and every single-word change
changes it."""

from __future__ import annotations

import numpy as np
import pytest

from torchvitals.store.integrity import NH_KEYS, NH_STEP, NH_WORDS, nh64

MASK = (1 << 64) - 1


def nh64_reference(data: bytes) -> int:
    """The definition: words times keys summed mod 2**64 per block, blocks chained by
    NH_STEP, the length first and the tail (little-endian, times the first key) last."""
    n = len(data)
    whole = n - n % 8
    words = np.frombuffer(data[:whole], dtype="<u8")
    total = n
    for i in range(0, len(words), NH_WORDS):
        block = words[i : i + NH_WORDS]
        total = (total * NH_STEP + int((block * NH_KEYS[: len(block)]).sum())) & MASK
    if whole < n:
        tail = int.from_bytes(data[whole:], "little")
        total = (total * NH_STEP + tail * int(NH_KEYS[0])) & MASK
    return total


@pytest.mark.parametrize(
    "size", [1, 7, 8, 9, 63, 4096, 8 * NH_WORDS, 8 * NH_WORDS + 13, 3 * 8 * NH_WORDS + 5]
)
def test_compiled_nh64_equals_its_definition(size):
    rng = np.random.default_rng(size)
    data = rng.integers(0, 256, size, dtype=np.uint8).tobytes()
    assert nh64(data) == nh64_reference(data)
    assert nh64(bytearray(data)) == nh64(memoryview(data)) == nh64(data)


def test_every_single_word_change_changes_it():
    rng = np.random.default_rng(1)
    data = bytearray(rng.integers(0, 256, 8 * 512, dtype=np.uint8).tobytes())
    base = nh64(data)
    for word in range(512):
        flipped = bytearray(data)
        flipped[8 * word + int(rng.integers(0, 8))] ^= 1 << int(rng.integers(0, 8))
        assert nh64(flipped) != base, word


def test_empty_input():
    assert nh64(b"") == nh64(None) == nh64_reference(b"") == 0
