"""The suite's own layout: test folders are not packages, so two test modules with one
basename in different folders would make pytest refuse to collect the second."""

from __future__ import annotations

from collections import Counter
from pathlib import Path


def test_test_module_names_are_unique_across_folders():
    names = Counter(p.name for p in Path(__file__).parent.rglob("test_*.py"))
    assert [name for name, count in names.items() if count > 1] == []
