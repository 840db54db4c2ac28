from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True, scope="package")
def one_torch_thread():
    """The models here are tiny: one thread is as fast alone and far faster when the cores are shared
    (two OpenMP threads waiting on each other under load made these tests several times slower)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
