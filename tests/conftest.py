"""Shared pytest set-up: import path, a single-thread fixture, the ../shared fixture path."""
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

SHARED_FIXTURES = os.path.join(ROOT, "..", "shared", "fixtures")
ORIGINAL_NET = os.path.join(SHARED_FIXTURES, "original-net.pkl")


@pytest.fixture
def original_net_path():
    """Path of the original PyHessianDist checkpoint; skips when ../shared is absent."""
    if not os.path.isfile(ORIGINAL_NET):
        pytest.skip("../shared/fixtures/original-net.pkl is not available")
    return ORIGINAL_NET


@pytest.fixture
def single_thread():
    """Run torch on one intra-op thread for the duration of a test.

    The tests' models are tiny; on a small, shared CPU two OpenMP threads competing with
    another busy process can be 10x slower than one, and one thread is what the
    subprocess tests get through OMP_NUM_THREADS=1 as well.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
