import os
import sys

import pytest
import torch

# tests/utils.py is importable as `utils` from every test module.
sys.path.insert(0, os.path.dirname(__file__))


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    """One intra-op thread for the whole suite: its tensors are tiny, and small convolutions, eigh and the
    unrolled steps ran 5-20x faster on one thread than on two on the 2-core machine (measured while building
    the suite: 2.7 ms vs 57 ms per tiny ConvNet forward; 0.5 s vs 16 s for eigh at D=784)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(autouse=True)
def _seed():
    """Every test starts from the same global seed (code under test must not rely on it: it takes generators)."""
    torch.manual_seed(0)
    yield


def pytest_collection_modifyitems(config, items):
    # `-m` not given: skip slow tests by default (make test-all runs them).
    if config.getoption("-m"):
        return
    skip_slow = pytest.mark.skip(reason="slow: run with -m slow or make test-all")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip_slow)
