"""pipelines.ray_runtime.start_ray: the one ``ray.init`` of extract and train, and Ray's noise that is ours to
silence (issue 14 item 9), checked against a real Ray runtime and a real ``regionflow train`` subprocess."""

from __future__ import annotations

import io
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
from tiny_store import random_rows, write_store

from pipelines.ray_runtime import (
    ADDRESS_ENV,
    COLOR_PREFIX_ENV,
    RAY_TRAIN_REPORT_LOGGERS,
    TOKEN_AUTH_LOGGER,
    TOKEN_AUTH_NOTICE,
    plain_prefix_unless_terminal,
    start_ray,
)

REPO = Path(__file__).resolve().parents[1]
# What Ray printed on every train run before (issue 14 item 9), with another Ray alive on the machine.
NOISE = (
    TOKEN_AUTH_NOTICE,
    "Found multiple active Ray instances",
    "PlacementGroupCleaner",
    "PreemptionWatcher",
    # trial 1 item 16: colour codes in a redirected log, Ray Train's per-report lines
    "\x1b[",
    "Reporting training result",
    "Checkpoint successfully created",
)


def test_workers_know_their_own_cluster(ray_session) -> None:
    """Every worker of the job, also one with its own runtime_env, has RAY_ADDRESS = its cluster's address."""
    ray = ray_session

    @ray.remote(num_cpus=0.01)
    def address() -> str | None:
        return os.environ.get(ADDRESS_ENV)

    expected = ray.get_runtime_context().gcs_address
    with_env = address.options(runtime_env={"env_vars": {"REGIONFLOW_TEST": "1"}})
    assert ray.get([address.remote(), with_env.remote()]) == [expected, expected]


def test_colour_prefix_off_unless_stderr_is_a_terminal(monkeypatch) -> None:
    """Ray's driver reads RAY_COLOR_PREFIX on every worker line it prints (ray._private.worker, Ray 2.60)."""

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    monkeypatch.delenv(COLOR_PREFIX_ENV, raising=False)
    plain_prefix_unless_terminal(Terminal())
    assert COLOR_PREFIX_ENV not in os.environ
    plain_prefix_unless_terminal(io.StringIO())
    assert os.environ[COLOR_PREFIX_ENV] == "0"
    monkeypatch.setenv(COLOR_PREFIX_ENV, "1")  # the user's choice is kept
    plain_prefix_unless_terminal(io.StringIO())
    assert os.environ[COLOR_PREFIX_ENV] == "1"


def test_ray_train_report_loggers_are_quiet_in_our_workers(ray_session) -> None:
    ray = ray_session
    import ray.train.v2._internal.execution.context as train_context  # the logger named by its file

    assert train_context.logger.name in RAY_TRAIN_REPORT_LOGGERS

    @ray.remote(num_cpus=0.01)
    def levels() -> list[int]:
        return [logging.getLogger(name).level for name in RAY_TRAIN_REPORT_LOGGERS]

    assert ray.get(levels.remote()) == [logging.WARNING] * len(RAY_TRAIN_REPORT_LOGGERS)


def test_an_initialized_runtime_is_used_as_it_is(ray_session) -> None:
    assert start_ray("10.0.0.1:6379") is False  # no second init, no connection attempt


def test_only_the_token_auth_notice_is_filtered(ray_session, caplog) -> None:
    start_ray()
    logger = logging.getLogger(TOKEN_AUTH_LOGGER)
    with caplog.at_level(logging.WARNING, logger=TOKEN_AUTH_LOGGER):
        logger.warning(f"{TOKEN_AUTH_NOTICE}. Set RAY_AUTH_MODE=disabled to opt out.")
        logger.warning(
            "Token authentication is disabled for this Ray cluster. Anyone with network access ..."
        )
    assert [r.getMessage().split(".")[0] for r in caplog.records] == [
        "Token authentication is disabled for this Ray cluster"
    ]


@pytest.mark.slow
def test_train_prints_none_of_rays_noise_beside_another_ray(ray_session, tmp_path: Path) -> None:
    """A real ``regionflow train`` (1 worker, 2 steps) while the test session's Ray is alive: the setting in
    which Ray printed a token notice, a 30-line PlacementGroupCleaner traceback and PreemptionWatcher lines."""
    store = write_store(tmp_path / "store", random_rows(8, 8, seed=1), 8, num_shards=1)
    argv = ["train", str(store), "--task", "retrieval", "--workers", "1", "--out", str(tmp_path / "run"),
            "--max-steps", "2", "--model-config", "tiny", "--batch-size", "4", "--threads", "1"]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != ADDRESS_ENV}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    done = subprocess.run(
        [sys.executable, "-m", "pipelines.cli", *argv], capture_output=True, text=True, env=env, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    output = done.stdout + done.stderr
    assert [n for n in NOISE if n in output] == [], output[-3000:]
    assert "train: done" in output  # the run's own lines still reach the terminal
