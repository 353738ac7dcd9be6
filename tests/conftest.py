"""Shared pytest fixtures and hooks (STYLE §8).

- ``_seeded_rng_and_threads`` (autouse): every test starts with torch's, numpy's legacy and Python's global
  RNGs seeded 0 and torch on one thread (``@pytest.mark.torch_threads(n)`` for another count); all of it is
  restored afterwards, so no test sees another's state.
- ``gpu`` marker: skipped, with the reason said, when CUDA is not available (one hook, no per-test skipif).
- ``ray_session``: one local Ray runtime for the whole test session, started as the commands start it.
- ``ray_cluster``: for a test that needs its own multi-node ``ray.cluster_utils.Cluster`` (marker ``cluster``):
  the session runtime is shut down for the test and restored after it, as ``ray_session`` started it.
- ``s3``: one loopback S3 server (``tests/s3server.py``, moto) per test module, with a bucket; the AWS
  environment points at it while the module runs.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest

RAY_TEST_CPUS = 4  # logical CPUs of the test runtime (detector actors + fractional read tasks)
TEST_SEED = 0
DEFAULT_TORCH_THREADS = 1


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The one gpu skip hook: tests marked ``gpu`` are skipped without CUDA."""
    gpu_tests = [item for item in items if item.get_closest_marker("gpu")]
    if not gpu_tests:
        return
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA (marker gpu): torch.cuda.is_available() is False")
    for item in gpu_tests:
        item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seeded_rng_and_threads(request: pytest.FixtureRequest) -> Iterator[None]:
    """Seed torch / numpy (legacy global) / Python RNGs with `TEST_SEED` and set torch's thread count for one
    test; restore all of them after it."""
    import torch

    marker = request.node.get_closest_marker("torch_threads")
    threads = int(marker.args[0]) if marker else DEFAULT_TORCH_THREADS
    saved_threads, saved_numpy, saved_python = (
        torch.get_num_threads(),
        np.random.get_state(),
        random.getstate(),
    )
    torch.set_num_threads(threads)
    try:
        with torch.random.fork_rng():
            torch.manual_seed(TEST_SEED)
            np.random.seed(TEST_SEED)
            random.seed(TEST_SEED)
            yield
    finally:
        torch.set_num_threads(saved_threads)
        np.random.set_state(saved_numpy)
        random.setstate(saved_python)


@pytest.fixture(scope="session")
def ray_session() -> Iterator[Any]:
    """A local Ray runtime shared by every pipeline test; shut down at the end of the session."""
    import ray

    _start_session_ray()
    yield ray
    ray.shutdown()


def _start_session_ray() -> None:
    from pipelines.ray_runtime import start_ray

    start_ray(num_cpus=RAY_TEST_CPUS, log_to_driver=False)  # as the commands start it (no-op if already up)


@pytest.fixture()
def ray_cluster() -> Iterator[Callable[[int], Any]]:
    """``make(head_cpus)`` -> a started ``Cluster`` whose head has ``head_cpus`` CPUs (add nodes to it).
    The session runtime is shut down first; afterwards this process disconnects, every cluster made is shut
    down and the session runtime is started again as `ray_session` starts it."""
    import ray
    from ray.cluster_utils import Cluster

    was_up = ray.is_initialized()
    if was_up:
        ray.shutdown()
    clusters: list[Any] = []

    def make(head_cpus: int) -> Any:
        clusters.append(Cluster(initialize_head=True, head_node_args={"num_cpus": head_cpus}))
        return clusters[-1]

    try:
        yield make
    finally:
        ray.shutdown()
        for cluster in clusters:
            cluster.shutdown()
        if was_up:
            _start_session_ray()


@pytest.fixture(scope="module")
def s3() -> Iterator[Any]:
    """A loopback S3 server with one bucket (`s3server.S3Server`: ``url``, ``upload``, ``keys``, ``client``)
    for the tests of one module; each test uses keys of its own."""
    pytest.importorskip("moto.server", reason="moto[server] provides the local S3 server")
    pytest.importorskip("boto3")
    from s3server import running_s3_server

    with running_s3_server() as server:
        yield server
