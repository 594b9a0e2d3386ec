"""Shared pytest set-up: import path, float64 default for library tests, fixture paths."""
import os
import sys

import pytest

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
