import os
import sys

import pytest
import torch

# tests/ holds shared helpers (tiny_models, helpers); make them importable as plain modules.
sys.path.insert(0, os.path.dirname(__file__))


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models on a shared 2-core machine: one torch thread is 10-50x faster than threads
    that fight over the cores with other jobs. Restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
