from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread():
    # These tests run hundreds of sampler steps on small tensors: with every core shared (tests and
    # other jobs in parallel), a second intra-op thread only adds contention, often tenfold.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
