"""The zoo's giants (over ~250M parameters) in ONE test, one model at a time: two xdist workers
must never hold two of them (each needs several GB per copy). Each goes through the core check
(trace + fuse_bn) and the channel-compiler check (random masks → fold → materialize = oracle)."""
from __future__ import annotations

import pytest

import test_zoo_channels
import test_zoo_core
from zoo_models import GIANTS, release_memory


@pytest.mark.zoo
def test_zoo_giants():
    failures = []
    for name in GIANTS:
        for check in (test_zoo_core.check_model, test_zoo_channels.check_model):
            try:
                check(name)
            except AssertionError as e:
                failures.append(f"{check.__module__} {name}: {e}")
            release_memory()
    assert not failures, "\n".join(failures)
