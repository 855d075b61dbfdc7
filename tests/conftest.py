import os
import sys

import pytest
import torch

# tests/utils.py is importable as `utils` from every test module.
sys.path.insert(0, os.path.dirname(__file__))


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
