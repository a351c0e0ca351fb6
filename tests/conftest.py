"""Shared test configuration.

* Hypothesis profiles: ``graphsel`` (default: no deadline, torch code is slow to start) and
  ``thorough`` (10× the examples; ``HYPOTHESIS_PROFILE=thorough pytest ...``).
* Torch uses one intra-op thread per test process (``pytest -n 2`` already fills two cores and
  the models under test are small); override with ``GRAPHSEL_TEST_THREADS``.
* ``from strategies import architectures`` and ``from tests.strategies import architectures``
  both work.
"""
from __future__ import annotations

import os
import sys

import pytest
import torch
from hypothesis import HealthCheck, settings

_TESTS = os.path.dirname(os.path.abspath(__file__))
for _p in (_TESTS, os.path.dirname(_TESTS)):
    if _p not in sys.path:
        sys.path.insert(0, _p)

torch.set_num_threads(int(os.environ.get("GRAPHSEL_TEST_THREADS", "1")))

_COMMON = dict(deadline=None, print_blob=True,
               suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("graphsel", **_COMMON)
settings.register_profile("thorough", max_examples=1000, **_COMMON)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "graphsel"))


@pytest.fixture(autouse=True)
def _seed_torch():
    """Every test starts from the same global torch RNG state."""
    torch.manual_seed(0)
    yield


@pytest.fixture
def private_op_table():
    """Registrations made by the test (graphsel.register_op) are undone afterwards."""
    from graphsel.ops import table
    saved = {name: dict(getattr(table._TABLE, name)) for name in ("modules", "functions", "methods", "qualnames")}
    yield
    for name, entries in saved.items():
        getattr(table._TABLE, name).clear()
        getattr(table._TABLE, name).update(entries)
    table._TABLE.version += 1
    table._TABLE.by_type.clear()
