"""Pre-flight tests run torch on one thread: their matrices are tiny (one thread is the
fastest there, also on a busy CI machine) and the results are then deterministic."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
