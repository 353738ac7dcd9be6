"""Shared pytest fixtures. ``ray_session``: one local Ray runtime for the whole test session (STYLE §8)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

RAY_TEST_CPUS = 4  # logical CPUs of the test runtime (detector actors + fractional read tasks)


@pytest.fixture(scope="session")
def ray_session() -> Iterator[Any]:
    """A local Ray runtime shared by every pipeline test; shut down at the end of the session."""
    ray = pytest.importorskip("ray")
    if not ray.is_initialized():
        ray.init(num_cpus=RAY_TEST_CPUS, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()
