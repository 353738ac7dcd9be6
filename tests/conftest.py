"""Shared pytest fixtures. ``ray_session``: one local Ray runtime for the whole test session (STYLE §8)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

RAY_TEST_CPUS = 4  # logical CPUs of the test runtime (detector actors + fractional read tasks)


@pytest.fixture(scope="session")
def ray_session() -> Iterator[Any]:
    """A local Ray runtime shared by every pipeline test; shut down at the end of the session."""
    import ray

    from pipelines.ray_runtime import start_ray

    start_ray(num_cpus=RAY_TEST_CPUS, log_to_driver=False)  # as the commands start it (no-op if already up)
    yield ray
    ray.shutdown()
