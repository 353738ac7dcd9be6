"""Starting or joining Ray for regionflow's commands (``extract``, ``train``): one ``ray.init``, and Ray's
noise that is ours to silence silenced at its cause (issue 14 item 9; README *Ray's messages*).

- A new local instance, never a stranger's: without ``--address`` / ``RAY_ADDRESS`` Ray starts its own
  (``address="local"``), even when another Ray runs on the machine.
- ``ray.init`` runs from the folder holding regionflow's packages: Ray puts the driver's working directory on
  its workers' ``sys.path``, so a user's own ``model.py`` cannot shadow ours; no working directory is shipped.
- Token authentication: Ray enables it by default for a local instance and warns that it did so on every
  start ("Token authentication is enabled for this Ray cluster ..."); that one notice is filtered out of the
  driver's log (the warning that authentication is *disabled* is kept).
- Every worker process of our job gets ``RAY_ADDRESS`` = the address of the cluster it belongs to (a
  ``runtime_env`` ``worker_process_setup_hook``). Ray Train's ``PlacementGroupCleaner`` actor looks the
  cluster up through the State API without an address; with another Ray alive on the machine it found
  "multiple active Ray instances" and printed a 30-line traceback.
- Local runs only: the State API needs the dashboard, which a local regionflow run does not start, so the
  cleaner's "Failed to query Ray Train Controller actor state" warnings (one per second) are silenced in our
  workers; its job (freeing a dead controller's placement group) ends with the local instance anyway. Ray
  Train's ``PreemptionWatcher`` (node drains of a cluster, meaningless on one machine) is not started:
  ``RAY_TRAIN_ENABLE_PREEMPTION_WATCHER=0`` unless the caller set it. On a cluster (``--address``) both work
  as Ray designed them.
- Colour: Ray wraps each worker line's ``(DetectorActor pid=…)`` prefix in ANSI colour codes. When stderr is
  not a terminal (a log file, a pipe) ``RAY_COLOR_PREFIX=0`` is set for this process (unless the caller set
  it), which Ray's driver-side log printer (``ray._private.worker.print_worker_logs``, Ray 2.60) reads on
  every line: plain ``(pid=…)`` prefixes.
- Ray Train's per-report worker lines, ``Reporting training result N: …`` (every checkpoint, every rank) and
  ``Checkpoint successfully created at: …``: their loggers are set to WARNING in our workers
  (``quiet_ray_train_reports``; the run prints its own checkpoint line at the end).

Only ``pipelines/`` imports Ray (STYLE §1).
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Any

import ray

log = logging.getLogger(__name__)

PACKAGE_HOME = Path(__file__).resolve().parents[1]  # the folder holding regionflow's packages
ADDRESS_ENV = "RAY_ADDRESS"
PREEMPTION_WATCHER_ENV = "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"
TOKEN_AUTH_LOGGER = "ray._private.authentication.authentication_token_setup"
TOKEN_AUTH_NOTICE = "Token authentication is enabled for this Ray cluster"
PLACEMENT_GROUP_CLEANER_LOGGER = "ray.train.v2._internal.execution.controller.placement_group_cleaner"
COLOR_PREFIX_ENV = "RAY_COLOR_PREFIX"  # "0": no ANSI colour around worker-line prefixes (Ray 2.60)
# Ray Train's per-report INFO lines: the context module logs under its *file path* (getLogger(__file__)).
RAY_TRAIN_REPORT_LOGGERS = (
    str(Path(ray.__file__).parent / "train" / "v2" / "_internal" / "execution" / "context.py"),
    "ray.train.v2._internal.execution.storage",  # "Checkpoint successfully created at: ..."
    "ray.train._internal.storage",
)


class _DropTokenAuthNotice(logging.Filter):
    """Drops Ray's per-start notice that token authentication is on (Ray's default; nothing to do)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(TOKEN_AUTH_NOTICE)


_TOKEN_AUTH_FILTER = _DropTokenAuthNotice()


def worker_setup() -> None:
    """``worker_process_setup_hook`` of a job joined with ``--address``: Ray's own address lookups in our
    worker processes find this cluster, not "the latest" or several; Ray Train's per-report lines are off."""
    os.environ[ADDRESS_ENV] = ray.get_runtime_context().gcs_address
    quiet_ray_train_reports()


def quiet_ray_train_reports() -> None:
    """Ray Train's per-report INFO lines off in this process (``RAY_TRAIN_REPORT_LOGGERS`` to WARNING).

    Called by the worker setup hook and again at the start of each training rank's loop: Ray Train configures
    the ``ray.train`` logger when a rank starts (``logging.config.dictConfig``), which resets the level of
    every ``ray.train.*`` logger that existed before.
    """
    for name in RAY_TRAIN_REPORT_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)


def local_worker_setup() -> None:
    """``worker_process_setup_hook`` of a local run: `worker_setup`, and the ``PlacementGroupCleaner``'s
    State API warnings silenced (a local run has no dashboard, so that API cannot answer)."""
    worker_setup()
    logging.getLogger(PLACEMENT_GROUP_CLEANER_LOGGER).setLevel(logging.ERROR)


def plain_prefix_unless_terminal(stream: Any) -> None:
    """Set ``RAY_COLOR_PREFIX=0`` (unless already set) when ``stream`` is not a terminal: Ray's driver then
    prints worker-line prefixes without ANSI colour codes."""
    isatty = getattr(stream, "isatty", None)
    if not (callable(isatty) and isatty()):
        os.environ.setdefault(COLOR_PREFIX_ENV, "0")


def start_ray(
    address: str | None = None,
    *,
    num_cpus: int | None = None,
    runtime_env: dict[str, Any] | None = None,
    log_to_driver: bool = True,
) -> bool:
    """Join the cluster at ``address`` (else ``$RAY_ADDRESS``), or start a new local Ray instance.

    Args:
        address: a Ray cluster address (``--address``); ``None`` or ``""``: ``$RAY_ADDRESS``, else local.
        num_cpus: logical CPUs of a new local instance (``None``: Ray's default, the machine's cores);
            ignored when joining a cluster.
        runtime_env: extra job-level ``runtime_env`` entries (the setup hook is added to them).
        log_to_driver: stream the workers' output to this process (``train``'s progress comes from rank 0);
            the test session turns it off.

    Returns:
        True when this call connected to Ray; False when Ray was already initialized in this process (a
        test session's runtime, or a caller's own ``ray.init``), which is then used as it is.
    """
    logging.getLogger(TOKEN_AUTH_LOGGER).addFilter(_TOKEN_AUTH_FILTER)
    plain_prefix_unless_terminal(sys.stderr)
    if ray.is_initialized():
        return False
    address = address or os.environ.get(ADDRESS_ENV) or None
    if address is None:
        os.environ.setdefault(PREEMPTION_WATCHER_ENV, "0")
    env = {
        **(runtime_env or {}),
        "worker_process_setup_hook": worker_setup if address else local_worker_setup,
    }
    here = os.getcwd()
    os.chdir(PACKAGE_HOME)
    try:
        if address:
            ray.init(address=address, runtime_env=env, log_to_driver=log_to_driver)
        else:
            ray.init(
                address="local",
                num_cpus=num_cpus,
                include_dashboard=False,
                runtime_env=env,
                log_to_driver=log_to_driver,
            )
    finally:
        os.chdir(here)
    log.debug("Ray %s at %s", "joined" if address else "started", ray.get_runtime_context().gcs_address)
    return True
